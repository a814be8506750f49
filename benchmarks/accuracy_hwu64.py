"""Layer-1 accuracy on HWU64 development bots: our guard against naive max-cosine, by the same code.

Each bot in benchmarks/hwu64/bots.json has a scope (a set of HWU64 intents) and a scenario document
written by hand from that scope alone (benchmarks/hwu64/bots/). Its on-topic rows are the scope's
rows; every other row is off-topic, except context-free fillers ("yes", "stop", "say that again"),
which no scenario document can judge alone.

    python benchmarks/accuracy_hwu64.py [--split test] [--data ../shared/data/hwu64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from guardrail.evaluation import report
from guardrail.guard import Guard
from guardrail.layers.similarity import load_background, softmax_pool

HERE = Path(__file__).parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "hwu64"


NAIVE = "max cosine to the bullets (naive)"
SHIPPED = "minus pooled background, covered dropped (shipped)"


def ablation(guard: Guard, vectors: np.ndarray, background: np.ndarray) -> dict[str, np.ndarray]:
    """Layer 1 built up one step at a time, from naive max cosine to the shipped score."""
    document = guard.document
    bullets = guard.encoder.encode(document.scenarios)
    items = guard.similarity.item_vectors
    on_items = vectors @ items.T
    pooled = softmax_pool(on_items)
    return {
        NAIVE: (vectors @ bullets.T).max(axis=1),
        "max cosine to bullets and examples": on_items.max(axis=1),
        "pooled (tau 10) over bullets and examples": pooled,
        "minus pooled background, whole background": pooled - softmax_pool(vectors @ background.T),
        SHIPPED: guard.similarity.score(vectors)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", choices=["train", "valid", "test", "dev"], default="test")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()

    config = json.loads((HERE / "hwu64" / "bots.json").read_text())
    splits = ["train", "valid"] if args.split == "dev" else [args.split]
    rows = [json.loads(line) for s in splits for line in (args.data / f"{s}.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["intent"] not in set(config["fillers"])]
    texts = [r["text"] for r in rows]
    intents = np.array([r["intent"] for r in rows])

    lines = [
        "| bot | n on | n off | naive AUROC | naive block@95 | AUROC | block@95 | pass@leak5 | calibrated pass | calibrated block |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    totals: dict[str, list[float]] = {
        k: [] for k in ("naive_auroc", "naive_block", "auroc", "block", "leak", "pass", "cblock")
    }
    vectors = None
    steps: dict[str, list[tuple[float, float]]] = {}
    for bot, scope in config["bots"].items():
        guard = Guard.load(HERE / "hwu64" / "bots" / f"{bot}.md", cache_size=0)
        if vectors is None:
            vectors = guard.encoder.encode(texts)
            background = guard.encoder.encode(load_background())
        on_topic = np.isin(intents, scope)
        variants = ablation(guard, vectors, background)
        ours = report(variants[SHIPPED].astype(np.float64), on_topic, guard.threshold)
        naive = report(variants[NAIVE].astype(np.float64), on_topic, 0.0)
        for name, variant in variants.items():
            result = report(variant.astype(np.float64), on_topic, 0.0)
            steps.setdefault(name, []).append((result.auroc, result.block_rate_at_pass_95))
        for key, value in zip(
            totals,
            (
                naive.auroc,
                naive.block_rate_at_pass_95,
                ours.auroc,
                ours.block_rate_at_pass_95,
                ours.pass_rate_at_leak_5,
                ours.pass_rate,
                ours.block_rate,
            ),
            strict=True,
        ):
            totals[key].append(value)
        lines.append(
            f"| {bot} | {ours.n_on} | {ours.n_off} | {naive.auroc:.4f} | {naive.block_rate_at_pass_95:.1%} | "
            f"{ours.auroc:.4f} | {ours.block_rate_at_pass_95:.1%} | {ours.pass_rate_at_leak_5:.1%} | "
            f"{ours.pass_rate:.1%} | {ours.block_rate:.1%} |"
        )
    mean = {k: float(np.mean(v)) for k, v in totals.items()}
    lines.append(
        f"| **mean** | | | {mean['naive_auroc']:.4f} | {mean['naive_block']:.1%} | **{mean['auroc']:.4f}** | "
        f"**{mean['block']:.1%}** | {mean['leak']:.1%} | {mean['pass']:.1%} | {mean['cblock']:.1%} |"
    )
    lines += [
        "",
        "What each step adds (mean over the bots, same vectors):",
        "",
        "| scoring | AUROC | block@95 |",
        "|---|---|---|",
    ]
    for name, values in steps.items():
        auroc, block = np.mean(values, axis=0)
        lines.append(f"| {name} | {auroc:.4f} | {block:.1%} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        from _results import record

        record(
            f"Layer-1 accuracy, HWU64 {args.split}",
            f"{len(config['bots'])} development bots, {len(rows)} rows ({args.split} split, fillers excluded). "
            "naive = max cosine to the scenario bullets; block@95 = off-topic blocked when 95% of on-topic "
            "pass; calibrated = at the threshold calibrated from the scenario document alone. Dropping the "
            "background messages a document covers is for that calibration, not the ranking (see README).\n\n"
            + table,
        )


if __name__ == "__main__":
    main()
