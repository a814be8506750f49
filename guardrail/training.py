"""Retraining layer 3 from logged interactions: labels, a held-back comparison, and promotion.

`guardrail retrain` reads interaction logs (each with its rotated backups) and labelled JSONL files, and
turns their records into weighted labels. A row with "on_topic" and no "verdict" is a labelled row.

    source   weight  what gives the label
    human    1.0     a labelled row; a feedback record, joined to its request by id (the last one wins)
    layer 2  0.8     off topic: the LLM answered a passed request with the refusal sentence
                     (``llm_refused``; in logs older than that field, a reply starting with the refusal)
    weak     0.3     a confident decision: a blocked (or shadow "would-block") request scored far below
                     its threshold is off topic; a passed request the LLM answered, not with the refusal,
                     scored far above it, is on topic

"Far" comes from the records themselves: the farthest half of the margins on each side of the
threshold, per scale (layer 1, or a classifier's probability) and threshold value, so no constant is
tuned to one log. Each text (whitespace collapsed, case kept) then gives one example: its label of most
weight, among equals the most recent, so a human label overrides every other label of the text.
Records that give no label are counted by reason: no_text, unjudged, upstream_error, no_score,
with_context (judged with the previous turn, so the score is not the text's own), reply_unknown,
near_threshold, not_a_request, feedback_unknown_id.

A stratified share of the examples (``holdout``) is held back. The threshold passes ``target_pass`` of
on-topic examples in out-of-fold predictions over the rest (``FOLDS`` folds), so it is not read off
predictions of the data the model was fitted on. A model fitted on the rest is compared on the holdout
with the model in place (the classifier at ``out``, else layer 1): AUROC, and the share of off-topic
examples blocked at the threshold that passes ``target_pass`` of on-topic ones. Where there are enough,
only human labels set the threshold and only human and layer-2 labels judge the comparison: weak labels
are the old model's own confident decisions, easy for it by construction. For the same reason the
card lists short hashes of the texts a model was trained on (``trained_on``), and the comparison leaves
out the examples the model in place has seen, when enough remain. A model trailing on either number by
more than ``TOLERANCE`` is not promoted. A promoted model is refitted on every example with the same
seed and written beside its card (``write_classifier``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm  # a dependency of huggingface-hub

from guardrail.errors import ConfigError, DataError, MissingExtraError, ModelError
from guardrail.evaluation import (
    Metrics,
    labelled_row,
    measure,
    on_topic_of,
    stratified_folds,
    stratified_split,
    threshold_for_pass,
)
from guardrail.guard import Guard, normalise
from guardrail.interactions import logs_named, read_records
from guardrail.layers.classifier import CARD_FORMAT, Classifier, card_path
from guardrail.layers.instruction import RefusalDetector
from guardrail.layers.similarity import FEATURE_NAMES
from guardrail.settings import DEFAULT_REFUSAL

Source = Literal["human", "layer2", "weak"]
WEIGHTS: dict[Source, float] = {"human": 1.0, "layer2": 0.8, "weak": 0.3}
MIN_EXAMPLES = 20  # of each label, to train at all
MIN_HOLDOUT = 3  # of each label in the holdout, to compare at all
FOLDS = 5
TOLERANCE = 0.01  # how far a new model may trail the current one, in AUROC and in block rate
_CHUNK = 256  # texts embedded per progress step
_FINGERPRINT = 12  # hex digits of SHA-256 per trained-on text: 48 bits, no collision in practice


@dataclass(frozen=True)
class Label:
    """One labelled text; ``order`` is its position in the input, so a later one is more recent."""

    text: str
    on_topic: bool
    source: Source
    order: int

    @property
    def weight(self) -> float:
        """How much the example counts in training."""
        return WEIGHTS[self.source]


@dataclass(frozen=True)
class LabelSet:
    """The examples to train on, one per distinct text, and what was left out."""

    labels: list[Label]
    skipped: dict[str, int]
    duplicates: int  # labels merged into another of the same text
    conflicts: int  # texts whose labels disagreed

    def sources(self) -> dict[Source, int]:
        """How many examples each source labelled."""
        counts = Counter(label.source for label in self.labels)
        return {source: counts[source] for source in WEIGHTS}


def read_labels(paths: Sequence[Path], refusal: str = DEFAULT_REFUSAL) -> LabelSet:
    """Read logs (with their backups) and labelled files, derive the labels and deduplicate them."""
    detector = RefusalDetector(refusal)
    skipped: Counter[str] = Counter()
    labels: list[Label] = []
    requests: list[tuple[int, dict[str, Any]]] = []
    feedback: dict[str, tuple[int, bool]] = {}
    for order, (path, number, row) in enumerate(_rows(paths), start=1):
        if row.get("type") == "feedback":
            feedback[str(row.get("id"))] = (order, on_topic_of(row, str(path), number))
        elif "verdict" in row:
            requests.append((order, _slim(row, detector)))
        elif "on_topic" in row:
            labelled, on_topic = labelled_row(row, str(path), number)
            labels.append(Label(labelled, on_topic, "human", order))
        else:
            skipped["not_a_request"] += 1
    known: set[str] = set()
    weak: list[tuple[Label, tuple[str, float, bool], float]] = []
    for order, record in requests:
        text, rid = record.get("text"), str(record.get("id"))
        has_text = isinstance(text, str) and bool(text.strip())
        if has_text:
            known.add(rid)
        if has_text and rid in feedback:
            at, on_topic = feedback[rid]
            labels.append(Label(str(text), on_topic, "human", at))
            continue
        reason = _unusable(record) if has_text else "no_text"
        if reason is not None:
            skipped[reason] += 1
            continue
        passed = record["verdict"] == "passed"
        refused = record.get("llm_refused")
        if refused is None and passed:
            refused = record["reply_refused"]
        if refused is True:
            labels.append(Label(str(text), False, "layer2", order))
        elif passed and refused is None:
            skipped["reply_unknown"] += 1
        else:
            score, threshold = float(record["score"]), float(record["threshold"])
            scale = "similarity" if record.get("classifier_score") is None else "classifier"
            margin = score - threshold if passed else threshold - score
            weak.append((Label(str(text), passed, "weak", order), (scale, threshold, passed), margin))
    skipped["feedback_unknown_id"] += len(feedback.keys() - known)
    # Per scale, threshold and side, the half of the records farthest from the threshold.
    margins: dict[tuple[str, float, bool], list[float]] = {}
    for _, key, margin in weak:
        margins.setdefault(key, []).append(margin)
    cuts = {key: float(np.median(values)) for key, values in margins.items()}
    for label, key, margin in weak:
        if margin >= cuts[key] and margin > 0:
            labels.append(label)
        else:
            skipped["near_threshold"] += 1
    return deduplicate(labels, {reason: n for reason, n in sorted(skipped.items()) if n})


def deduplicate(labels: Sequence[Label], skipped: dict[str, int] | None = None) -> LabelSet:
    """One example per normalised text: the label of most weight, then the most recent."""
    by_text: dict[str, list[Label]] = {}
    for label in sorted(labels, key=lambda label: label.order):
        by_text.setdefault(normalise(label.text), []).append(label)
    kept = [max(group, key=lambda label: (label.weight, label.order)) for group in by_text.values()]
    conflicts = sum(len({label.on_topic for label in group}) > 1 for group in by_text.values())
    kept.sort(key=lambda label: label.order)
    return LabelSet(kept, dict(skipped or {}), len(labels) - len(kept), conflicts)


def _rows(paths: Sequence[Path]) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    yield from read_records(logs_named(paths))


_FIELDS = ("id", "text", "verdict", "score", "threshold", "classifier_score", "used_context", "upstream")


def _slim(record: dict[str, Any], detector: RefusalDetector) -> dict[str, Any]:
    """What labelling needs of a request record, without the reply: logs can outgrow memory."""
    slim = {name: record.get(name) for name in (*_FIELDS, "llm_refused")}
    reply = record.get("reply")
    slim["reply_refused"] = detector.matches(reply) if isinstance(reply, str) and reply else None
    return slim


def _unusable(record: dict[str, Any]) -> str | None:
    """Why a request record with text gives no label of its own, or None."""
    verdict = record.get("verdict")
    if verdict not in ("passed", "blocked", "would-block"):
        return "unjudged"
    upstream = record.get("upstream")
    upstream = upstream if isinstance(upstream, dict) else {}
    status = upstream.get("status")
    if upstream.get("error") or (isinstance(status, int) and status >= 400):
        return "upstream_error"
    if record.get("llm_refused") is True:
        return None  # layer 2's label needs no score
    if not all(isinstance(record.get(k), (int, float)) for k in ("score", "threshold")):
        return "no_score"
    if record.get("used_context"):
        return "with_context"
    return None


# --- retraining ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retraining:
    """What `guardrail retrain` found and did; ``card`` is the written card, None when not promoted."""

    data: LabelSet
    new: Metrics
    previous: Metrics
    previous_note: str | None  # a caveat about the comparison with the model at ``out``
    threshold: float
    pass_rate: float  # of held-back on-topic examples at ``threshold``
    evaluated_on: str
    promoted: bool
    reason: str | None  # why not, in one paragraph
    card: dict[str, Any] | None


def retrain(
    guard: Guard,
    paths: Sequence[Path],
    out: Path,
    *,
    seed: int = 0,
    holdout: float = 0.2,
    target_pass: float = 0.95,
    force: bool = False,
    refusal: str = DEFAULT_REFUSAL,
    progress: bool = False,
) -> Retraining:
    """Label, train, compare with the model at ``out`` (else layer 1), and write the new one if better."""
    from guardrail.learning import fit, to_onnx

    try:  # before minutes of embedding, not after
        import skl2onnx  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            f"retraining needs scikit-learn and skl2onnx ({exc.name} is missing): "
            "pip install 'guardrail[train]'"
        ) from exc
    if not 0.0 < holdout <= 0.5:
        raise ConfigError(f"holdout must be in (0, 0.5], got {holdout}")
    if not 0.5 <= target_pass < 1.0:
        raise ConfigError(f"target_pass must be in [0.5, 1), got {target_pass}")
    if out.suffix != ".onnx":
        raise ConfigError(f"the classifier file must end in .onnx (its card is the .json), got {out}")
    data = read_labels(paths, refusal)
    where = ", ".join(str(p) for p in paths)
    on_topic = np.array([label.on_topic for label in data.labels], dtype=bool)
    n_on, n_off = int(on_topic.sum()), int((~on_topic).sum())
    if min(n_on, n_off) < MIN_EXAMPLES:
        raise DataError(
            f"not enough labelled data: {n_on} on-topic and {n_off} off-topic examples "
            f"({sum(data.skipped.values())} records gave no label, {data.duplicates} duplicates merged); "
            f"retraining needs at least {MIN_EXAMPLES} of each",
            where,
        )
    train, held = stratified_split(on_topic, holdout, seed)
    if min(int(on_topic[held].sum()), int((~on_topic[held]).sum())) < MIN_HOLDOUT:
        raise DataError(
            f"a holdout of {holdout:.0%} keeps back fewer than {MIN_HOLDOUT} on-topic or off-topic "
            "examples to compare models on: give more data or a larger --holdout",
            where,
        )
    weights = np.array([label.weight for label in data.labels], dtype=np.float64)
    human = np.array([label.source == "human" for label in data.labels], dtype=bool)
    features, layer1 = _features(guard, [label.text for label in data.labels], progress)

    with tqdm(total=FOLDS + 1, desc="fitting", unit="model", disable=not progress, file=sys.stderr) as bar:
        fold = stratified_folds(on_topic[train], FOLDS, seed)
        oof = np.empty(len(train), dtype=np.float64)
        for k in range(FOLDS):
            part = train[fold != k]
            model = fit(features[part], on_topic[part], weights[part], seed)
            oof[fold == k] = model.predict_proba(features[train[fold == k]])[:, 1]
            bar.update()
        # The threshold from human labels when there are enough: weak on-topic labels are the easy ones.
        calibrate = on_topic[train] & human[train]
        if calibrate.sum() < MIN_EXAMPLES:
            calibrate = on_topic[train]
        threshold = float(np.clip(threshold_for_pass(oof[calibrate], target_pass), 0.0, 1.0))
        candidate = fit(features[train], on_topic[train], weights[train], seed)
        bar.update()

        judged, evaluated_on, current, note = _judged(guard, out, data, held)
        truth = on_topic[judged]
        new_scores = candidate.predict_proba(features[judged])[:, 1]
        new = measure("new model", new_scores, truth, target_pass)
        previous = (
            measure("layer 1", layer1[judged], truth, target_pass)
            if current is None
            else measure(current.name, current.predict(features[judged]), truth, target_pass)
        )
        pass_rate = float(np.mean(new_scores[truth] >= threshold))
        worse = new.auroc < previous.auroc - TOLERANCE or new.block_rate < previous.block_rate - TOLERANCE
        reason = _refusal(new, previous, truth, target_pass, out) if worse else None
        promoted = force or not worse
        card = None
        if promoted:
            bar.total += 1
            final = fit(features, on_topic, weights, seed)
            bar.update()
            model_bytes = to_onnx(final, features.shape[1])
            card = {
                "format": CARD_FORMAT,
                "encoder": guard.encoder.id,
                "features": ["embedding", *FEATURE_NAMES],
                "n_features": int(features.shape[1]),
                "threshold": threshold,
                "target_pass": target_pass,
                "seed": seed,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "scenario": {
                    "name": guard.document.name,
                    "title": guard.document.title,
                    "digest": guard.document.digest,
                },
                "data": {
                    "examples": len(data.labels),
                    "on_topic": n_on,
                    "off_topic": n_off,
                    "train": len(train),
                    "holdout": len(held),
                    "duplicates": data.duplicates,
                    "conflicts": data.conflicts,
                    "skipped": data.skipped,
                },
                "label_sources": {
                    source: {"count": count, "weight": WEIGHTS[source]}
                    for source, count in data.sources().items()
                },
                "metrics": {
                    "evaluated_on": evaluated_on,
                    "holdout": {
                        "auroc": new.auroc,
                        "block_rate_at_target_pass": new.block_rate,
                        "pass_rate_at_threshold": pass_rate,
                    },
                    "previous": previous.as_dict(),
                    "forced": worse,
                },
                "model": " ".join(repr(final).split())[:500],
                "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
                "trained_on": "".join(_fingerprint(label.text) for label in data.labels),
                "guardrail_version": _version(),
            }
            write_classifier(out, model_bytes, card)
    return Retraining(data, new, previous, note, threshold, pass_rate, evaluated_on, promoted, reason, card)


def _features(
    guard: Guard, texts: list[str], progress: bool
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Layer 3's inputs and layer 1's scores, embedding texts of similar length together."""

    order = np.argsort([len(t) for t in texts], kind="stable")
    features = np.empty((len(texts), guard.encoder.dim + len(FEATURE_NAMES)), dtype=np.float32)
    scores = np.empty(len(texts), dtype=np.float32)
    with tqdm(total=len(texts), desc="embedding", unit="text", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(texts), _CHUNK):
            idx = order[start : start + _CHUNK]
            scored = guard.similarity.evaluate(guard.encoder.encode([texts[i] for i in idx]))
            features[idx], scores[idx] = scored.features, scored.scores
            bar.update(len(idx))
    return features, scores


def _judged(
    guard: Guard, out: Path, data: LabelSet, held: NDArray[np.intp]
) -> tuple[NDArray[np.intp], str, Classifier | None, str | None]:
    """The held-back examples to compare on, what they are, the model in place and a note on it."""
    sources = [data.labels[i].source for i in held]
    trusted = held[np.array([source != "weak" for source in sources], dtype=bool)]
    judged, evaluated_on = (held, "all labels")
    if _enough(data, trusted):
        judged, evaluated_on = trusted, "human and layer-2 labels"
    if not out.exists():
        return judged, evaluated_on, None, None
    try:
        current = Classifier.load(out, guard.encoder.id, guard.encoder.dim)
    except ModelError as exc:
        return judged, evaluated_on, None, f"{exc}; compared with layer 1 instead"
    # The model in place was fitted on every example it had: those it saw would flatter it.
    seen = str(current.card.get("trained_on", ""))
    seen_set = {seen[i : i + _FINGERPRINT] for i in range(0, len(seen), _FINGERPRINT)}
    unseen = judged[np.array([_fingerprint(data.labels[i].text) not in seen_set for i in judged], bool)]
    if len(unseen) == len(judged):
        return judged, evaluated_on, current, None
    if _enough(data, unseen):
        return unseen, f"{evaluated_on}, not seen by {current.name}", current, None
    note = f"{current.name} was trained on most of the held-back examples: the comparison favours it"
    return judged, evaluated_on, current, note


def _enough(data: LabelSet, indices: NDArray[np.intp]) -> bool:
    on = sum(data.labels[i].on_topic for i in indices)
    return bool(min(on, len(indices) - on) >= MIN_HOLDOUT)


def _fingerprint(text: str) -> str:
    """A short hash of a normalised text, for the card's list of what the model was trained on."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:_FINGERPRINT]


def _refusal(new: Metrics, previous: Metrics, truth: NDArray[np.bool_], target_pass: float, out: Path) -> str:
    return (
        f"the new model is worse than {previous.name} on the {len(truth)} held-back examples "
        f"({int(truth.sum())} on-topic, {int((~truth).sum())} off-topic): AUROC {new.auroc:.4f} against "
        f"{previous.auroc:.4f}, and with {target_pass:.0%} of on-topic messages passed it blocks "
        f"{new.block_rate:.1%} of off-topic ones against {previous.block_rate:.1%}; a new model may trail "
        f"by at most {TOLERANCE} on each. {out} is unchanged; retrain with more or better labelled data, "
        "or pass --force to promote it anyway."
    )


def write_classifier(out: Path, model: bytes, card: dict[str, Any]) -> None:
    """Write the model and its card, each replaced in one rename, the card first.

    A watcher reloads when either file changes; the card carries the model's SHA-256, so a load that
    falls between the two renames can tell the pair apart.
    """
    files = [(card_path(out), json.dumps(card, indent=2).encode() + b"\n"), (out, model)]
    temps: list[Path] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for path, content in files:
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temps.append(temp)
            with open(temp, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
        for temp, (path, _) in zip(temps, files, strict=True):
            os.replace(temp, path)
    except OSError as exc:
        raise ModelError(f"cannot write the classifier {out}: {exc}") from exc
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink()


def _version() -> str:
    from guardrail import __version__

    return __version__
