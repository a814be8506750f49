"""The main job on the embedded default: a real local LLM, guarded by ``guardrail serve``.

Starts llama-cpp-python's server with a small model from PyPI, puts ``guardrail serve`` in front of it
with the real-estate scenario, and sends on- and off-topic questions through the official ``openai``
SDK, streamed and not. For each it prints the verdict, layer, score and the answer or refusal.

    .venv/bin/python scripts/demo.py [--model smollm2|qwen] [--out demo-output]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from openai import OpenAI

from llm import LlamaServer, gguf_path

ROOT = Path(__file__).resolve().parents[1]

# (question, stream): a mix of what a real-estate bot's users type, on topic and not.
CONVERSATIONS: list[tuple[list[str], bool]] = [
    (["Can I book a viewing of the two-bed flat on Maple Street this Saturday?"], False),
    (["What's the weather going to be like in Lisbon tomorrow?"], False),
    (["The kitchen tap in my rental has been leaking for a week. Who fixes it?"], True),
    (["Give me a recipe for banana bread"], True),
    (["How much deposit do I need for a mortgage on a 300k house?"], False),
    (["Write a Python function that reverses a string"], False),
    # A follow-up that means nothing alone: judged with the previous user turn.
    (["Are there flats near the station that allow pets?", "and is the second one still available?"], True),
    (["Who won the football match last night?"], True),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "qwen"], default="smollm2", help="the local LLM")
    parser.add_argument("--out", type=Path, default=ROOT / "demo-output", help="where the log goes")
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "real_estate.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "interactions.jsonl"

    print(f"== starting the local LLM ({args.model}, llama-cpp-python) ...", flush=True)
    with LlamaServer(gguf_path(args.model)) as llm:
        print(f"   {llm.model_id} at {llm.base_url}")
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        command = [
            str(Path(sys.executable).with_name("guardrail")),
            "serve",
            "--scenario",
            str(args.scenario),
            "--upstream",
            llm.base_url,
            "--port",
            str(port),
            "--log-path",
            str(log_path),
            "--log-level",
            "warning",
        ]
        print(f"== starting guardrail: {' '.join(command[1:])}", flush=True)
        proxy = subprocess.Popen(command, cwd=ROOT)
        try:
            _wait_ready(f"{base}/healthz", proxy)
            _ask(OpenAI(base_url=f"{base}/v1", api_key="sk-demo-not-a-real-key", max_retries=0))
            print()
            print(f"== the interaction log (one JSON line per request): {log_path}")
            print(f"== Prometheus metrics, served at {base}/metrics while the proxy runs:")
            with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
                for line in response.read().decode().splitlines():
                    if line.startswith(SHOWN) and not line.endswith(" 0.0"):
                        print(f"   {line}")
        finally:
            proxy.terminate()
            proxy.wait(timeout=20)
    print(f"== done; the log is complete now: {sum(1 for _ in log_path.open())} lines in {log_path}")
    return 0


# The requests by verdict, and the tokens refusing them saved (estimated: see the README's "Savings").
SHOWN = ("guardrail_requests_total{", "guardrail_tokens_saved_total{", "guardrail_upstream_tokens_total{")


def _ask(client: OpenAI) -> None:
    for turns, stream in CONVERSATIONS:
        messages: list[dict[str, str]] = []
        for i, question in enumerate(turns):
            messages.append({"role": "user", "content": question})
            last = i == len(turns) - 1
            started = time.perf_counter()
            if stream and last:
                raw = client.chat.completions.with_raw_response.create(
                    model="local",
                    messages=messages,
                    max_tokens=60,
                    stream=True,  # type: ignore[arg-type]
                )
                answer = "".join(
                    chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices
                )
            else:
                raw = client.chat.completions.with_raw_response.create(
                    model="local",
                    messages=messages,
                    max_tokens=60,  # type: ignore[arg-type]
                )
                answer = raw.parse().choices[0].message.content or ""
            seconds = time.perf_counter() - started
            messages.append({"role": "assistant", "content": answer})
            if not last:
                continue
            headers = raw.headers
            print()
            for earlier in turns[:-1]:
                print(f"   (earlier: {earlier})")
            print(f"Q: {question}   [{'streamed' if stream else 'not streamed'}]")
            print(
                f"   {headers['x-guardrail-verdict']} by {headers['x-guardrail-layer']}, "
                f"score {headers['x-guardrail-score']}, nearest scenario: {headers['x-guardrail-scenario']}"
            )
            answer = " ".join(answer.split())
            print(f"A: {answer[:300]}{'...' if len(answer) > 300 else ''}   ({seconds:.2f} s)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"guardrail serve exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"guardrail serve did not answer {url} within {timeout:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
