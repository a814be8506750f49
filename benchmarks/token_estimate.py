"""Tokens saved, checked against a real LLM: are blocked requests' estimated prompt tokens honest?

Goal (issue 5): over a run against the real local LLM, the estimated prompt tokens of blocked requests
are within ±10% of what the upstream reports for those same requests sent to it directly.

For each local model (llama.cpp's server, ``scripts/llm.py``), ``guardrail serve`` runs in front of it
with the real-estate scenario, and one run goes like live traffic:

1. **Before calibration**: off-topic conversations, which the proxy blocks. Their estimates come from
   the defaults alone (no usage seen yet).
2. **Calibration**: on-topic conversations, which pass; the upstream's ``usage`` teaches the proxy the
   model's tokens per character and per message (``guardrail/accounting.py``).
3. **After calibration**: other off-topic conversations, blocked, estimated with what was learned.
4. **The truth**: every blocked conversation is sent straight to the upstream (``max_tokens=1``), and
   its ``usage.prompt_tokens`` is what it would have cost.

The conversations vary the way real ones do: no system prompt or one of a few lengths, 0 to 4 earlier
turns, short and long questions. The estimate of each blocked request is read from its interaction
record (``saved.prompt_tokens``); the goal is checked on the sum over the blocked requests after
calibration, and per-request errors are reported too.

    python benchmarks/token_estimate.py [--models smollm2 qwen] [--quick] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "scripts"))

from llm import LlamaServer, gguf_path  # noqa: E402

TARGET = 0.10  # |estimated - reported| / reported, summed over blocked requests

SYSTEM_PROMPTS = [
    None,
    "You are the assistant of a real estate agency.",
    "You are Ava, the virtual assistant of Harbour Homes, an independent estate and letting agency. "
    "Answer questions about properties for sale and to let, viewings, valuations, offers, tenancies and "
    "maintenance. Be concise, friendly and accurate; never invent a property that is not listed.",
    "You are the customer service assistant of Northgate Lettings. Keep answers under 100 words.\n"
    "Office hours: Monday to Friday 9:00-17:30, Saturday 10:00-14:00.\nEmergency repairs line: "
    "0800 123 4567.\nDeposits are protected with the DPS. Viewings need 24 hours' notice.\n"
    "Never give legal advice; suggest Citizens Advice instead.",
]
HISTORY = [
    ("Hi, I'm looking for a two bedroom flat near the station.",
     "Happy to help! We have three two-bedroom flats within ten minutes of the station at the moment."),
    ("What is the rent on the one on Maple Street?", "The Maple Street flat is 1,150 a month, bills extra."),
    ("Is it furnished?", "It comes part furnished: white goods, beds and a sofa."),
    ("Can I see it this week?", "Yes, we have viewings on Thursday at 5 and Saturday at 11."),
]  # fmt: skip
ON_TOPIC = [
    "Can I book a viewing of the two-bed flat on Maple Street this Saturday?",
    "What documents do I need to rent a flat through you?",
    "The boiler in my flat has stopped working, who should I call?",
    "How much is the deposit for a one bedroom apartment?",
    "I'd like to get a valuation for my three bedroom house before we move abroad next spring.",
    "Do you have any houses to buy near good primary schools for under 400k?",
    "I'm a landlord and want you to manage my two flats on Church Road; what are your fees?",
    "Any update on the leaking tap I reported last week? The reference is 4471.",
    "Is the cottage on Mill Lane still available and does it allow pets?",
    "I would like to make an offer of 320k on the semi at 14 Oak Lane.",
    "How long does it usually take to complete a house purchase once an offer is accepted?",
    "Can I end my tenancy early if I give two months' notice?",
]
OFF_TOPIC = [
    "Give me a recipe for banana bread with walnuts.",
    "What's the weather going to be like in Paris tomorrow?",
    "Write me a short poem about cats sleeping in the sun.",
    "Who won the football world cup in 2014?",
    "Can you help me with my calculus homework? I need the derivative of x squared times sine x.",
    "Translate 'good morning, how are you' into Japanese please.",
    "What are the best exercises to lose belly fat quickly at home without any equipment?",
    "Explain how photosynthesis works in simple terms for a ten year old.",
    "Recommend a good science fiction novel for a long flight.",
    "How do I reset my iPhone to factory settings?",
    "Tell me a joke about programmers and coffee.",
    "What is the capital of Australia and why isn't it Sydney?",
]


def conversation(rng: random.Random, question: str) -> list[dict[str, str]]:
    messages = []
    system = rng.choice(SYSTEM_PROMPTS)
    if system is not None:
        messages.append({"role": "system", "content": system})
    for user, assistant in HISTORY[: rng.randint(0, len(HISTORY))]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": question})
    return messages


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_proxy(upstream: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [str(Path(sys.executable).with_name("guardrail")), "serve", "--scenario", "scenarios/real_estate.md",
               "--upstream", upstream, "--port", str(port), "--log-path", str(log_path), "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SystemExit(f"guardrail serve exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("guardrail serve did not start within 120 s")
        time.sleep(0.2)


def chat(client: httpx.Client, base: str, messages: list[dict[str, str]], max_tokens: int) -> httpx.Response:
    body = {"model": "local", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = client.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return response


def run_model(name: str, n_blocked: int, n_passed: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    before = [conversation(rng, rng.choice(OFF_TOPIC)) for _ in range(n_blocked)]
    calibration = [conversation(rng, rng.choice(ON_TOPIC)) for _ in range(n_passed)]
    after = [conversation(rng, rng.choice(OFF_TOPIC)) for _ in range(n_blocked)]
    with LlamaServer(gguf_path(name)) as llama, tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "interactions.jsonl"
        proxy, base = start_proxy(llama.base_url, log_path)
        ids: dict[str, list[str]] = {"before": [], "after": []}
        sent: dict[str, list[dict[str, str]]] = {}  # each blocked request's conversation, by record id
        passed = 0
        try:
            with httpx.Client() as client:
                for phase, conversations in (
                    ("before", before),
                    ("calibration", calibration),
                    ("after", after),
                ):
                    for messages in conversations:
                        response = chat(client, base, messages, max_tokens=16)
                        verdict = response.headers["x-guardrail-verdict"]
                        if phase == "calibration":
                            passed += verdict == "passed"
                        elif verdict == "blocked":
                            ids[phase].append(response.headers["x-guardrail-id"])
                            sent[ids[phase][-1]] = messages
                    print(f"  {name}: {phase} done")
                # The truth: each blocked conversation, straight to the upstream.
                truth: dict[str, int] = {}
                for record_id, messages in sent.items():
                    usage = chat(client, llama.base_url, messages, max_tokens=1).json()["usage"]
                    truth[record_id] = usage["prompt_tokens"]
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(30)
        records = {r["id"]: r for r in map(orjson.loads, log_path.read_bytes().splitlines()) if "id" in r}
    return {
        "name": name,
        "ids": ids,
        "truth": truth,
        "records": records,
        "passed": passed,
        "n_passed": n_passed,
    }


def summarise(result: dict[str, Any], phase: str) -> dict[str, float]:
    estimated, reported, errors = 0.0, 0, []
    for record_id in result["ids"][phase]:
        record = result["records"][record_id]
        estimate = float(record["saved"]["prompt_tokens"])
        truth = result["truth"][record_id]
        estimated += estimate
        reported += truth
        errors.append(abs(estimate - truth) / truth)
    return {
        "n": len(errors),
        "estimated": estimated,
        "reported": reported,
        "total_error": (estimated - reported) / reported if reported else float("nan"),
        "median_error": statistics.median(errors) if errors else float("nan"),
        "p90_error": sorted(errors)[int(0.9 * (len(errors) - 1))] if errors else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen"], choices=["smollm2", "qwen"])
    parser.add_argument("--quick", action="store_true", help="fewer requests, for a smoke test")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()
    n_blocked, n_passed = (12, 12) if args.quick else (40, 40)
    started = time.perf_counter()
    rows, verdicts = [], []
    for i, name in enumerate(args.models):
        result = run_model(name, n_blocked, n_passed, seed=i)
        for phase, label in (("before", "defaults (before any usage)"), ("after", "calibrated")):
            s = summarise(result, phase)
            rows.append(
                f"| {name} | {label} | {s['n']} | {s['estimated']:,.0f} | {s['reported']:,} | "
                f"**{s['total_error']:+.1%}** | {s['median_error']:.1%} | {s['p90_error']:.1%} |"
            )
            print(rows[-1])
            if phase == "after":
                ok = abs(s["total_error"]) <= TARGET
                verdicts.append(
                    f"{name}: {'PASS' if ok else 'FAIL'} ({s['total_error']:+.1%} over {s['n']} blocked requests "
                    f"after {result['passed']} passed ones of {result['n_passed']} calibrated it)"
                )
    elapsed = time.perf_counter() - started
    body = "\n".join(
        [
            "`guardrail serve` (real-estate scenario) in front of llama.cpp's server with each local model "
            "(`scripts/llm.py`). Conversations vary: no system prompt or one of three lengths, 0-4 earlier "
            "turns, short and long questions. Blocked requests are estimated before any usage was seen "
            f"(defaults), then again after {n_passed} on-topic requests passed and their reported usage "
            "calibrated the estimate. The truth is `usage.prompt_tokens` from the same conversations sent "
            f"straight to the upstream. The script took {elapsed:.0f} s.",
            "",
            "| model | estimate | blocked requests | estimated prompt tokens | reported | total error | "
            "median error per request | p90 error per request |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"**Goal: the total within ±{TARGET:.0%} after calibration.** " + "; ".join(verdicts) + ".",
        ]
    )
    print(body)
    if not args.no_record:
        sys.path.insert(0, str(HERE))
        from _results import record

        record("Tokens saved: the estimate against the real LLM", body)


if __name__ == "__main__":
    main()
