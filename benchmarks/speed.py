"""Layer-1 speed: what a decision costs on top of the encoder call, cache hits, cold start, throughput.

1. Decision latency against one bare encoder call, at 1 and 2 intra-op threads. Every message is
   unique, so the decision cache never hits; encoder calls and decisions are interleaved (and their
   order alternated) so machine noise falls on both. Target: decision p50 <= 1.15x encoder p50.
2. A repeated message served from the decision cache. Target: p50 and p99 <= 0.3 ms.
3. Cold start with a warm export cache, in fresh subprocesses: from `import guardrail` through
   `Guard.load("scenarios/real_estate.md")` to the first decision. Target: median <= 1.5 s.
4. Bare encoder throughput on one thread, one message per call, for reference.

The machine is assumed to be small and shared: medians are quoted, and ratios come from one run.

    GUARDRAIL_CACHE_DIR=/tmp/gcache python benchmarks/speed.py [--quick] [--no-record]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from guardrail.encoder import Encoder
from guardrail.guard import Guard, normalise
from guardrail.layers.similarity import SimilarityLayer
from guardrail.scenario import load_scenario

HERE = Path(__file__).parent
ROOT = HERE.parent
SCENARIO = "scenarios/real_estate.md"  # relative to ROOT, as a bot owner would pass it

DECISION_TARGET = 1.15  # decision p50 / encoder p50
CACHE_TARGET_MS = 0.3
COLD_TARGET_S = 1.5

# Short user messages, some on topic for the real-estate bot and some not: the guard does the same
# work either way, but realistic lengths matter because the encoder's cost grows with token count.
# fmt: off
TEMPLATES: list[tuple[str, dict[str, list[str]]]] = [
    ("can I book a viewing for the {home} on {street} {when}?", {
        "home": ["two bed flat", "3 bedroom house", "studio apartment", "cottage", "townhouse", "penthouse"],
        "street": ["Maple Street", "Oak Lane", "Riverside Drive", "Church Road", "Station Avenue", "Elm Close"],
        "when": ["this Saturday", "tomorrow afternoon", "next Tuesday morning", "after work on Friday"],
    }),
    ("do you have any {home} for {deal} in {area} under {price}?", {
        "home": ["two bed flats", "family houses", "studios", "bungalows", "new builds", "houses with a garden"],
        "deal": ["rent", "sale"],
        "area": ["the city centre", "Northfield", "the old town", "Westbury", "Kingsmead", "the harbour area"],
        "price": ["1200 a month", "900 a month", "350k", "500 thousand", "1500 a month"],
    }),
    ("the {thing} in my {place} has {problem} since {when}", {
        "thing": ["boiler", "shower", "kitchen tap", "washing machine", "front door lock", "heating"],
        "place": ["flat", "apartment", "rented house", "bathroom"],
        "problem": ["stopped working", "been leaking", "been making a loud noise", "broken down"],
        "when": ["yesterday", "last week", "Monday night", "the weekend"],
    }),
    ("how long does it take to get my {money} back after {event}?", {
        "money": ["deposit", "security deposit", "holding deposit", "tenancy deposit"],
        "event": ["moving out", "the final inspection", "the lease ends", "handing back the keys",
                  "the check out visit", "ending my tenancy early"],
    }),
    ("what are your {fee} if I {action} through your agency?", {
        "fee": ["fees", "commission rates", "management fees", "letting fees"],
        "action": ["sell my house", "rent out my flat", "let my apartment", "sell my late mother's home",
                   "let two properties", "sell a buy to let"],
    }),
    ("is the {home} on {street} close to {amenity}?", {
        "home": ["3 bedroom", "detached house", "ground floor flat", "semi", "new listing"],
        "street": ["Maple Street", "Oak Lane", "Riverside Drive", "Church Road", "Station Avenue", "Elm Close"],
        "amenity": ["any good primary schools", "a train station", "the supermarket", "a bus stop", "a park"],
    }),
    ("any update on the {issue} I reported {when}? reference {ref}", {
        "issue": ["leaking tap", "broken window", "damp patch", "faulty oven", "blocked drain"],
        "when": ["last week", "on Monday", "two days ago", "a fortnight ago"],
        "ref": ["4471", "5120", "3388", "7302", "6019"],
    }),
    ("I would like to make an offer of {price} on {listing}", {
        "price": ["320k", "410 thousand", "the asking price", "295,000", "five percent under asking"],
        "listing": ["the house on Oak Lane", "flat 4 at Harbour View", "the cottage in Westbury",
                    "the semi on Church Road", "your listing on Elm Close"],
    }),
    ("can you tell me {what} for {thing}?", {
        "what": ["a good recipe", "the best temperature", "how long to cook", "some tips", "a quick method"],
        "thing": ["banana bread", "a roast chicken", "chocolate chip cookies", "vegetable lasagne",
                  "homemade pizza dough", "a lemon drizzle cake"],
    }),
    ("what will the weather be like in {city} {when}?", {
        "city": ["London", "Madrid", "Berlin", "Chicago", "Tokyo", "Sydney", "Lisbon"],
        "when": ["this weekend", "tomorrow morning", "on Friday evening", "next week", "over the bank holiday"],
    }),
    ("write me a short {kind} about {topic} for my {person}", {
        "kind": ["poem", "story", "birthday message", "limerick", "toast"],
        "topic": ["autumn leaves", "our dog Max", "a rainy day", "friendship", "the sea"],
        "person": ["sister", "best friend", "grandmother", "colleague"],
    }),
    ("who won the {event} {when} and what was the score?", {
        "event": ["football match", "tennis final", "rugby game", "basketball game", "cricket test"],
        "when": ["last night", "on Sunday", "yesterday afternoon", "at the weekend"],
    }),
    ("please help me {task} before {deadline}", {
        "task": ["fix this python error in my script", "write a cover letter for a nursing job",
                 "translate this paragraph into French", "plan a three day trip to Rome",
                 "summarise this article about climate change"],
        "deadline": ["the meeting tomorrow", "Friday", "my exam next week", "tonight"],
    }),
    ("I am a landlord and want you to {service} my {home} in {area}", {
        "service": ["manage", "find tenants for", "value", "market"],
        "home": ["two bed flat", "terraced house", "student let", "studio"],
        "area": ["Northfield", "the old town", "Westbury", "Kingsmead"],
    }),
]
# fmt: on


def messages(seed: int = 0) -> list[str]:
    """Every distinct message of 8 to 15 words the templates make, in a fixed random order."""
    out: dict[str, str] = {}
    for template, slots in TEMPLATES:
        names = list(slots)
        for values in itertools.product(*(slots[n] for n in names)):
            text = template.format(**dict(zip(names, values, strict=True)))
            if 8 <= len(text.split()) <= 15:
                out.setdefault(normalise(text), text)  # the guard's own cache key
    texts = list(out.values())
    random.Random(seed).shuffle(texts)
    return texts


def percentiles(samples: list[float], qs: tuple[int, ...] = (50, 90)) -> dict[int, float]:
    """Percentiles of samples in seconds, returned in milliseconds."""
    return {q: float(np.percentile(samples, q)) * 1e3 for q in qs}


def timed(fn: Callable[..., object], *args: object) -> float:
    """Seconds one call of fn(*args) takes."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def decision_vs_encoder(threads: int, pool: list[str], pairs: int, warmup: int) -> dict[str, float]:
    """Interleave bare encoder calls and uncached decisions; every text is used once per guard."""
    encoder = Encoder.load(threads=threads)
    guard = Guard(encoder, SimilarityLayer.build(load_scenario(ROOT / SCENARIO), encoder))
    need = 2 * (warmup + pairs)
    if len(pool) < need:
        raise SystemExit(f"only {len(pool)} distinct messages, {need} needed")
    texts = pool[:need]
    for i in range(warmup):
        encoder.encode([texts[2 * i]])
        guard.check(texts[2 * i + 1])
    encoder_s: list[float] = []
    decision_s: list[float] = []
    for k in range(warmup, warmup + pairs):
        on_encoder, on_guard = texts[2 * k], texts[2 * k + 1]
        if k % 2:
            encoder_s.append(timed(encoder.encode, [on_encoder]))
            decision_s.append(timed(guard.check, on_guard))
        else:
            decision_s.append(timed(guard.check, on_guard))
            encoder_s.append(timed(encoder.encode, [on_encoder]))
    # Every decision missed the cache: one entry per distinct text checked.
    assert len(guard._cache) == warmup + pairs, (len(guard._cache), warmup + pairs)
    enc, dec = percentiles(encoder_s), percentiles(decision_s)
    return {
        "threads": threads,
        "n": pairs,
        "enc_p50": enc[50],
        "enc_p90": enc[90],
        "dec_p50": dec[50],
        "dec_p90": dec[90],
        "ratio": dec[50] / enc[50],
    }


def cache_hits(guard: Guard, text: str, repeats: int) -> dict[int, float]:
    """Time guard.check on a text already decided."""
    first = guard.check(text)
    for _ in range(200):
        guard.check(text)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        verdict = guard.check(text)
        samples.append(time.perf_counter() - start)
        assert verdict is first
    return percentiles(samples, (50, 99))


COLD_START = r"""
import time
t0 = time.perf_counter()
import guardrail
t1 = time.perf_counter()
import guardrail.guard as _g
splits = {"encoder": 0.0, "layer": 0.0}
def _wrap(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            splits[name] += time.perf_counter() - start
    return classmethod(wrapper)
_g.Encoder.load = _wrap("encoder", _g.Encoder.load.__func__)
_g.SimilarityLayer.build = _wrap("layer", _g.SimilarityLayer.build.__func__)
t2 = time.perf_counter()
guard = guardrail.Guard.load(%(scenario)r)
t3 = time.perf_counter()
verdict = guard.check(%(text)r)
t4 = time.perf_counter()
import json
print(json.dumps({"import": t1 - t0, "load": t3 - t2, "encoder_load": splits["encoder"],
                  "layer_build": splits["layer"], "first": t4 - t3, "total": (t1 - t0) + (t4 - t2)}))
"""


def cold_start(runs: int, text: str) -> list[dict[str, float]]:
    """Fresh interpreters: import, Guard.load and the first decision, timed from inside the process."""
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", COLD_START % {"scenario": SCENARIO, "text": text}],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run["process"] = time.perf_counter() - start  # includes interpreter start-up and exit
        out.append(run)
    return out


def throughput(pool: list[str], seconds: float) -> dict[str, float]:
    """Single-message encoder calls on one thread, back to back, for about ``seconds``."""
    encoder = Encoder.load(threads=1)
    for text in pool[:20]:
        encoder.encode([text])
    samples = []
    start = time.perf_counter()
    for text in itertools.cycle(pool):
        samples.append(timed(encoder.encode, [text]))
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return {"n": len(samples), "per_s": len(samples) / elapsed, "p50": percentiles(samples)[50]}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples, for a smoke test")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()
    pairs, warmup, repeats, cold_runs, seconds = (
        (100, 10, 2000, 3, 1.0) if args.quick else (400, 30, 20000, 5, 3.0)
    )

    load_before = os.getloadavg()[0]
    pool = messages()
    words = [len(t.split()) for t in pool]
    print(
        f"{len(pool)} distinct messages, {min(words)}-{max(words)} words (median {statistics.median(words):g})"
    )

    lines = []
    rows = []
    for threads in (1, 2):
        r = decision_vs_encoder(threads, pool, pairs, warmup)
        rows.append(r)
        print(
            f"[1] threads={threads}: encoder p50 {r['enc_p50']:.2f} ms p90 {r['enc_p90']:.2f} ms | "
            f"decision p50 {r['dec_p50']:.2f} ms p90 {r['dec_p90']:.2f} ms | ratio {r['ratio']:.3f} "
            f"-> {verdict(r['ratio'] <= DECISION_TARGET)}"
        )
    lines += [
        f"**1. Uncached decision vs one bare encoder call** ({pairs} interleaved pairs per row, every "
        f"message unique, {warmup} pairs of warm-up; target decision p50 <= {DECISION_TARGET}x encoder p50)",
        "",
        "| intra-op threads | encoder p50 | encoder p90 | decision p50 | decision p90 | p50 overhead | p50 ratio | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['threads']} | {r['enc_p50']:.2f} ms | {r['enc_p90']:.2f} ms | {r['dec_p50']:.2f} ms | "
        f"{r['dec_p90']:.2f} ms | {r['dec_p50'] - r['enc_p50']:+.2f} ms | {r['ratio']:.3f} | {verdict(r['ratio'] <= DECISION_TARGET)} |"
        for r in rows
    ]

    encoder = Encoder.load(threads=1)
    guard = Guard(encoder, SimilarityLayer.build(load_scenario(ROOT / SCENARIO), encoder))
    hit = cache_hits(guard, pool[0], repeats)
    ok = hit[99] <= CACHE_TARGET_MS
    print(
        f"[2] cached decision ({repeats} calls): p50 {hit[50]:.4f} ms p99 {hit[99]:.4f} ms -> {verdict(ok)}"
    )
    lines += [
        "",
        f"**2. Repeated message, from the decision cache** ({repeats} calls of `guard.check` on one "
        f"decided text; target <= {CACHE_TARGET_MS} ms): p50 {hit[50]:.4f} ms, p99 {hit[99]:.4f} ms "
        f"- {verdict(ok)}",
    ]

    runs = cold_start(cold_runs, pool[1])
    med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    ok = med["total"] <= COLD_TARGET_S
    print(
        f"[3] cold start ({cold_runs} fresh processes, medians): total {med['total']:.3f} s = import "
        f"{med['import']:.3f} s + load {med['load']:.3f} s (encoder {med['encoder_load']:.3f} s, layer "
        f"{med['layer_build']:.3f} s) + first decision {med['first'] * 1e3:.1f} ms; whole process "
        f"{med['process']:.3f} s -> {verdict(ok)}"
    )
    print("    totals: " + ", ".join(f"{run['total']:.3f}" for run in runs))
    lines += [
        "",
        f"**3. Cold start, warm export cache** ({cold_runs} fresh processes; `import guardrail` through "
        f'`Guard.load("{SCENARIO}")` to the first decision; target median <= {COLD_TARGET_S} s)',
        "",
        "| | median |",
        "|---|---|",
        f"| **total** | **{med['total']:.3f} s** |",
        f"| `import guardrail` | {med['import']:.3f} s |",
        f"| `Guard.load` | {med['load']:.3f} s |",
        f"| - of which `Encoder.load` | {med['encoder_load']:.3f} s |",
        f"| - of which `SimilarityLayer.build` | {med['layer_build']:.3f} s |",
        f"| first decision | {med['first'] * 1e3:.1f} ms |",
        f"| whole process, with interpreter start and exit | {med['process']:.3f} s |",
        "",
        f"{verdict(ok)}; totals of each run: " + ", ".join(f"{run['total']:.3f} s" for run in runs),
    ]

    tp = throughput(pool, seconds)
    print(
        f"[4] encoder, 1 thread, one message per call: {tp['per_s']:.0f} messages/s "
        f"({tp['n']} calls, p50 {tp['p50']:.2f} ms)"
    )
    lines += [
        "",
        f"**4. Bare encoder throughput, 1 thread, one message per call** (reference): "
        f"{tp['per_s']:.0f} messages/s ({tp['n']} calls, p50 {tp['p50']:.2f} ms)",
    ]

    body = (
        f"Model {encoder.id}, scenario `{SCENARIO}`; {len(pool)} distinct template-made user messages of "
        f"{min(words)}-{max(words)} words. Times are per call, wall clock. 1-minute load average before the "
        f"run: {load_before:.2f} (other work on this machine shows up as noise, most of all at 2 threads).\n\n"
        + "\n".join(lines)
    )
    if not args.no_record:
        from _results import record

        record("Layer-1 speed", body)


if __name__ == "__main__":
    main()
