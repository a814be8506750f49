"""Evaluate a guard on labelled messages: ranking quality and the operating point's pass and block rates.

Also the seeded, stratified splits `guardrail retrain` compares models on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from guardrail.errors import DataError, MissingExtraError

Scores = NDArray[np.float64]


@dataclass(frozen=True)
class LabelledData:
    """Messages with their on-topic labels."""

    texts: list[str]
    on_topic: NDArray[np.bool_]


@dataclass(frozen=True)
class EvalReport:
    """The numbers `guardrail eval` prints."""

    auroc: float
    block_rate_at_pass_95: float
    pass_rate_at_leak_5: float
    threshold: float
    pass_rate: float
    block_rate: float
    n_on: int
    n_off: int

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


def load_labelled(path: str | Path) -> LabelledData:
    """Read a JSONL file of ``{"text": str, "on_topic": bool}`` rows; errors name the line."""
    name = str(path)
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read the data file: {exc}", name) from exc
    texts: list[str] = []
    labels: list[bool] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc}", name, number) from exc
        if not isinstance(row, dict):
            raise DataError('each line must be a JSON object {"text": ..., "on_topic": ...}', name, number)
        text, label = labelled_row(row, name, number)
        texts.append(text)
        labels.append(label)
    on_topic = np.array(labels, dtype=bool)
    if not on_topic.any() or on_topic.all():
        raise DataError("the data needs both on-topic and off-topic rows to be evaluated", name)
    return LabelledData(texts, on_topic)


def labelled_row(row: dict[str, Any], name: str, number: int) -> tuple[str, bool]:
    """The text and label of a ``{"text", "on_topic"}`` row, or ``DataError`` naming its line."""
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError('"text" must be a non-empty string', name, number)
    return text, on_topic_of(row, name, number)


def on_topic_of(row: dict[str, Any], name: str, number: int) -> bool:
    """A row's ``on_topic`` label, or ``DataError`` naming its line."""
    label = row.get("on_topic")
    if not isinstance(label, bool):
        raise DataError(f'"on_topic" must be true or false, got {label!r}', name, number)
    return label


def auroc(on: Scores, off: Scores) -> float:
    """Probability that an on-topic message outscores an off-topic one (ties count half)."""
    values = np.concatenate([on, off])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # Average rank of each distinct value, so ties share their ranks.
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    n_on, n_off = len(on), len(off)
    return float((ranks[:n_on].sum() - n_on * (n_on + 1) / 2) / (n_on * n_off))


def threshold_for_pass(on: Scores, pass_rate: float) -> float:
    """The highest threshold that lets at least ``pass_rate`` of on-topic messages through."""
    ordered = np.sort(on)
    return float(ordered[int(np.floor((1 - pass_rate) * len(ordered) + 1e-9))])


def threshold_for_leak(off: Scores, leak: float) -> float:
    """The lowest threshold that lets at most ``leak`` of off-topic messages through."""
    ordered = np.sort(off)[::-1]
    allowed = int(np.floor(leak * len(ordered) + 1e-9))
    if allowed >= len(ordered):
        return float(ordered[-1])
    return float(np.nextafter(ordered[allowed], np.inf))


def report(scores: Scores, on_topic: NDArray[np.bool_], threshold: float) -> EvalReport:
    """Compute the evaluation report for ``scores`` (higher is more on topic) at ``threshold``."""
    on, off = scores[on_topic], scores[~on_topic]
    at_pass = threshold_for_pass(on, 0.95)
    at_leak = threshold_for_leak(off, 0.05)
    return EvalReport(
        auroc=auroc(on, off),
        block_rate_at_pass_95=float(np.mean(off < at_pass)),
        pass_rate_at_leak_5=float(np.mean(on >= at_leak)),
        threshold=float(threshold),
        pass_rate=float(np.mean(on >= threshold)),
        block_rate=float(np.mean(off < threshold)),
        n_on=len(on),
        n_off=len(off),
    )


def stratified_split(
    on_topic: NDArray[np.bool_], fraction: float, seed: int
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Indices of the examples to train on and to hold back: ``fraction`` of each label, seeded."""
    rng = np.random.default_rng(seed)
    held: list[NDArray[np.intp]] = []
    for value in (False, True):
        members = rng.permutation(np.flatnonzero(on_topic == value))
        held.append(members[: round(fraction * len(members))])
    holdout = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(on_topic)), holdout), holdout


def stratified_folds(on_topic: NDArray[np.bool_], folds: int, seed: int) -> NDArray[np.intp]:
    """Each example's fold, dealt out label by label in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(on_topic), dtype=np.intp)
    for value in (False, True):
        members = rng.permutation(np.flatnonzero(on_topic == value))
        fold[members] = np.arange(len(members)) % folds
    return fold


@dataclass(frozen=True)
class Metrics:
    """How well one model ranks the held-back examples."""

    name: str
    auroc: float
    block_rate: float  # of off-topic, at the threshold that passes target_pass of on-topic

    def as_dict(self) -> dict[str, Any]:
        """For the model card."""
        return {"name": self.name, "auroc": self.auroc, "block_rate_at_target_pass": self.block_rate}


def measure(name: str, scores: NDArray[Any], on_topic: NDArray[np.bool_], target_pass: float) -> Metrics:
    """AUROC and block rate at ``target_pass`` of ``scores`` (higher is more on topic)."""
    on, off = scores[on_topic].astype(np.float64), scores[~on_topic].astype(np.float64)
    cut = threshold_for_pass(on, target_pass)
    return Metrics(name, auroc(on, off), float(np.mean(off < cut)))


def plot_roc(
    scores: Scores, on_topic: NDArray[np.bool_], threshold: float, path: str | Path, title: str
) -> None:
    """Write a PNG ROC curve (pass rate of on-topic against leak of off-topic) with the operating point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError("--plot needs matplotlib: pip install 'guardrail[train]'") from exc
    on, off = scores[on_topic], scores[~on_topic]
    cuts = np.unique(scores)[::-1]
    leak = [0.0, *(float(np.mean(off >= c)) for c in cuts), 1.0]
    passed = [0.0, *(float(np.mean(on >= c)) for c in cuts), 1.0]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot(leak, passed, label=f"guard (AUROC {auroc(on, off):.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    op_leak, op_pass = float(np.mean(off >= threshold)), float(np.mean(on >= threshold))
    ax.scatter([op_leak], [op_pass], color="red", zorder=3, label=f"threshold {threshold:.3f}")
    ax.annotate(
        f"pass {op_pass:.1%}\nblock {1 - op_leak:.1%}",
        (op_leak, op_pass),
        (12, -30),
        textcoords="offset points",
    )
    ax.set_xlabel("off-topic messages passed (leak)")
    ax.set_ylabel("on-topic messages passed")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise DataError(f"cannot write the plot: {exc}", str(path)) from exc
    finally:
        plt.close(fig)
