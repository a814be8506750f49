"""Layer-3 speed: what a loaded classifier adds to a decision (goal: at most 0.3 ms).

A layer-3 model is trained the way `guardrail retrain` trains it (``guardrail.learning.fit`` on the
guard's features) on 3,000 labelled real-estate messages, on and off topic, made from this directory's
templates, so its bank of labelled vectors is full (``learning.BANK``). Then two guards that share one
encoder and one layer 1, one without the classifier and one with it, judge unique messages in
interleaved pairs, one message per call, one intra-op thread: the difference of their p50s is what
layer 3 adds on the request path, caches as cold as they are after the encoder. The classifier's own
run is timed too, right after an encoder call.

    python benchmarks/layer3_speed.py [--quick] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from guardrail.guard import Guard
from guardrail.layers.classifier import CARD_FORMAT, Classifier
from guardrail.layers.similarity import FEATURE_NAMES
from guardrail.learning import fit, to_onnx
from guardrail.settings import Settings

HERE = Path(__file__).parent
SCENARIO = HERE.parent / "scenarios" / "real_estate.md"
TARGET_MS = 0.3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer pairs, for a smoke test")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()
    pairs = 100 if args.quick else 600

    import proxy_speed  # this directory's message templates

    on = proxy_speed.make_messages(proxy_speed.ON_TOPIC, 1500 + 2 * pairs, seed=11)
    off = proxy_speed.make_messages(proxy_speed.OFF_TOPIC, 1500, seed=12)
    train_on, fresh = on[:1500], on[1500:]

    settings = Settings.load()
    base = Guard.load(SCENARIO, cache_dir=settings.cache_path, cache_size=0)
    texts = train_on + off
    features = base.similarity.evaluate(base.encoder.encode(texts)).features
    labels = np.array([True] * len(train_on) + [False] * len(off))
    started = time.perf_counter()
    model = fit(features, labels, np.ones(len(texts)), seed=0)
    fit_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.onnx"
        path.write_bytes(to_onnx(model, features.shape[1]))
        card = {
            "format": CARD_FORMAT,
            "encoder": base.encoder.id,
            "features": ["embedding", *FEATURE_NAMES],
            "n_features": features.shape[1],
            "threshold": 0.5,
        }
        path.with_suffix(".json").write_text(json.dumps(card))
        classifier = Classifier.load(path, base.encoder.id, base.encoder.dim)
        size = path.stat().st_size
    with_layer3 = Guard(base.encoder, base.similarity, cache_size=0, classifier=classifier)

    for text in fresh[:30]:  # warm-up
        base.check(text)
        with_layer3.check(text)
    plain, layered, own = [], [], []
    for i in range(pairs):
        a, b = fresh[2 * i], fresh[2 * i + 1]
        first, second = (base, with_layer3) if i % 2 else (with_layer3, base)
        for guard, text in ((first, a), (second, b)):
            start = time.perf_counter()
            guard.check(text)
            (layered if guard is with_layer3 else plain).append(time.perf_counter() - start)
        vectors = base.encoder.encode([a])
        row = base.similarity.evaluate(vectors).features
        start = time.perf_counter()
        classifier.predict(row)
        own.append(time.perf_counter() - start)

    ms = lambda xs, q=50: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    added = ms(layered) - ms(plain)
    ok = added <= TARGET_MS
    bank = len(getattr(model, "bank", []))
    body = "\n".join(
        [
            f"Model {base.encoder.id}, scenario `scenarios/real_estate.md`; layer 3 fitted by `learning.fit` on "
            f"{len(texts)} template-made messages ({len(train_on)} on topic) in {fit_seconds:.2f} s, "
            f"bank of {bank} labelled vectors, ONNX file {size / 2**20:.1f} MB. {pairs} interleaved pairs of "
            "unique messages, one per call, 1 intra-op thread. 1-minute load average "
            f"{os.getloadavg()[0]:.2f}.",
            "",
            "| | p50 | p90 |",
            "|---|---|---|",
            f"| decision, layer 1 only | {ms(plain):.2f} ms | {ms(plain, 90):.2f} ms |",
            f"| decision, layers 1 and 3 | {ms(layered):.2f} ms | {ms(layered, 90):.2f} ms |",
            f"| the classifier's own run, right after an encoder call | {ms(own):.3f} ms | {ms(own, 90):.3f} ms |",
            "",
            f"**Layer 3 adds {added:.3f} ms at p50** (target <= {TARGET_MS} ms): {'PASS' if ok else 'FAIL'}.",
        ]
    )
    print(body)
    print(
        f"(median of the difference per pair: {statistics.median(np.subtract(layered, plain)) * 1e3:.3f} ms)"
    )
    if not args.no_record:
        from _results import record

        record("Layer-3 speed", body)


if __name__ == "__main__":
    main()
