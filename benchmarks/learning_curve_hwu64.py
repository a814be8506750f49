"""Layer-3 learning curve on the HWU64 development bots: how many labelled messages retraining needs.

For each bot in benchmarks/hwu64/bots.json and each n, sample n labelled rows from HWU64's train split
(natural class balance: 2-13% on topic), fit layer 3 with ``guardrail.learning.fit`` on the guard's
features, and rank the evaluation split (test by default) with it. AUROC and block@95 (off-topic blocked
when 95% of on-topic pass) need no threshold, so nothing is calibrated. Baselines, on the same samples:
layer 1 alone, logistic regression on the embedding alone (scikit-learn defaults), and the previous
layer 3 (standardized logistic regression on all the features, C=1, balanced).

    python benchmarks/learning_curve_hwu64.py [--split test] [--ns 300 1000 3000] [--seeds 3]

Embeddings are cached in the temp directory (guardrail-learning-curve/), so reruns skip the encoder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from guardrail.evaluation import report
from guardrail.guard import Guard
from guardrail.learning import fit

HERE = Path(__file__).parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "hwu64"
METHODS = (
    "layer 1 alone",
    "LR on embedding",
    "previous layer 3",
    "layer 3 (learning.fit)",
)


def embed(guard: Guard, texts: list[str], split: str) -> np.ndarray:
    """The texts' embeddings, from the temp-dir cache when the same encoder embedded the same texts."""
    digest = hashlib.sha256(("\n".join(texts) + guard.encoder.id).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / "guardrail-learning-curve" / f"{split}-{digest}.npy"
    if path.exists():
        return np.load(path)
    vectors = guard.encoder.encode(texts)
    path.parent.mkdir(exist_ok=True)
    np.save(path, vectors)
    return vectors


def previous_fit(features: np.ndarray, labels: np.ndarray, seed: int) -> LogisticRegression:
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000, random_state=seed)
    )
    return model.fit(features, labels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", choices=["valid", "test"], default="test")
    parser.add_argument("--ns", type=int, nargs="+", default=[300, 1000, 3000])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()

    config = json.loads((HERE / "hwu64" / "bots.json").read_text())
    fillers = set(config["fillers"])

    def rows(split: str) -> list[dict[str, str]]:
        lines = (args.data / f"{split}.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["intent"] not in fillers]

    train, held = rows("train"), rows(args.split)
    train_intents = np.array([r["intent"] for r in train])
    held_intents = np.array([r["intent"] for r in held])

    # results[method][n] = [(auroc, block@95) per bot and seed]; fit seconds per n for learning.fit
    results: dict[str, dict[int, list[tuple[float, float]]]] = {m: {n: [] for n in args.ns} for m in METHODS}
    per_bot: dict[str, list[float]] = {}
    fit_seconds: dict[int, list[float]] = {n: [] for n in args.ns}
    train_vectors = held_vectors = None
    for b, (bot, scope) in enumerate(config["bots"].items()):
        guard = Guard.load(HERE / "hwu64" / "bots" / f"{bot}.md", cache_size=0)
        if train_vectors is None:
            train_vectors = embed(guard, [r["text"] for r in train], "train")
            held_vectors = embed(guard, [r["text"] for r in held], args.split)
        train_x = guard.similarity.evaluate(train_vectors).features
        scored = guard.similarity.evaluate(held_vectors)
        held_x = scored.features
        train_y, held_y = np.isin(train_intents, scope), np.isin(held_intents, scope)
        dim = train_vectors.shape[1]
        for n in args.ns:
            for seed in range(args.seeds):
                pick = np.random.default_rng([seed, b, n]).choice(len(train_y), size=n, replace=False)
                x, y = train_x[pick], train_y[pick]
                started = time.perf_counter()
                model = fit(x, y, np.ones(n), seed)
                fit_seconds[n].append(time.perf_counter() - started)
                plain = LogisticRegression(max_iter=5000).fit(x[:, :dim], y)
                scores = {
                    "layer 1 alone": scored.scores,
                    "LR on embedding": plain.decision_function(held_x[:, :dim]),
                    "previous layer 3": previous_fit(x, y, seed).decision_function(held_x),
                    "layer 3 (learning.fit)": model.predict_proba(held_x)[:, 1],
                }
                for method, s in scores.items():
                    r = report(np.asarray(s, dtype=np.float64), held_y, 0.0)
                    results[method][n].append((r.auroc, r.block_rate_at_pass_95))
                    if method == METHODS[-1] and n == max(args.ns):
                        per_bot.setdefault(bot, []).append(r.auroc)
        print(f"{bot}: done", flush=True)

    header = "| labelled rows (n) | " + " | ".join(f"{m} AUROC / block@95" for m in METHODS) + " |"
    lines = [header, "|---" * (len(METHODS) + 1) + "|"]
    for n in args.ns:
        cells = []
        for method in METHODS:
            auroc, block = np.mean(results[method][n], axis=0)
            cell = f"{auroc:.4f} / {block:.1%}"
            cells.append(f"**{cell}**" if method == METHODS[-1] else cell)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Worst bot (mean over seeds) and fit time of `learning.fit`:", ""]
    lines += [
        "| n | worst-bot AUROC | worst-bot block@95 | fit seconds (median / max) |",
        "|---|---|---|---|",
    ]
    n_bots = len(config["bots"])
    for n in args.ns:
        values = np.array(results[METHODS[-1]][n]).reshape(n_bots, args.seeds, 2).mean(axis=1)
        seconds = fit_seconds[n]
        lines.append(
            f"| {n} | {values[:, 0].min():.4f} | {values[:, 1].min():.1%} | "
            f"{np.median(seconds):.2f} / {max(seconds):.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        from _results import record

        record(
            f"Layer-3 learning curve, HWU64 {args.split}",
            f"{n_bots} development bots; for each n, {args.seeds} seeds of n labelled rows sampled from "
            f"the train split (natural class balance), evaluated on the {args.split} split ({len(held)} "
            "rows, fillers excluded). Mean over bots and seeds; block@95 = off-topic blocked when 95% of "
            "on-topic pass. LR on embedding = scikit-learn's LogisticRegression defaults on the embedding "
            "alone; previous layer 3 = standardized LR on embedding + layer-1 features (C=1, balanced).\n\n"
            + table,
        )


if __name__ == "__main__":
    main()
