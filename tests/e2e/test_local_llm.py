"""End to end: ``guardrail serve`` as a real process in front of a real llama.cpp server, driven by the
official ``openai`` SDK, as a user deploys it.

The upstream requires an API key, so a request that reaches it proves the client's Authorization header
came through. Whether the upstream was called is read from its own access log. The assertions are about
the proxy's behaviour; the small model's wording is never checked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from guardrail.settings import DEFAULT_REFUSAL

from llm import LlamaServer, gguf_path

API_KEY = "sk-e2e-secret-7f3a9c"
ON_TOPIC = "Can I book a viewing of the two-bed flat on Maple Street this Saturday?"
OFF_TOPIC = "Give me a recipe for banana bread with walnuts"
CHAT_LINE = '"POST /v1/chat/completions HTTP/1.1"'


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    """SmolLM2-135M behind llama-cpp-python's server, which demands ``API_KEY``."""
    with LlamaServer(gguf_path("smollm2"), api_key=API_KEY) as server:
        yield server


def upstream_chats(llama: LlamaServer) -> int:
    """How many chat completions the upstream has answered, from its access log."""
    return llama.log_path.read_text(errors="replace").count(CHAT_LINE)


class Guardrail:
    """A ``guardrail serve`` process."""

    def __init__(self, upstream: str, log_path: Path, cache_dir: Path, *extra: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        guardrail = Path(sys.executable).with_name("guardrail")
        command = [str(guardrail), "serve", "--scenario", "scenarios/real_estate.md", "--upstream", upstream]
        command += ["--port", str(self.port), "--log-path", str(log_path), "--log-level", "warning", *extra]
        environ = {**os.environ, "GUARDRAIL_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
        root = Path(__file__).resolve().parents[2]
        self.process = subprocess.Popen(command, cwd=root, env=environ)
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, f"guardrail serve exited with {self.process.returncode}"
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "guardrail serve did not start within 60 s"
            time.sleep(0.1)

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def stop(self) -> list[dict[str, Any]]:
        """Stop it as a process manager would (SIGTERM) and read the log it flushed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is a clean exit.
            assert self.process.wait(timeout=30) in (0, -signal.SIGTERM)
        return [orjson.loads(line) for line in self.log_path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def proxy(
    llama: LlamaServer, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guardrail]:
    server = Guardrail(llama.base_url, tmp_path_factory.mktemp("e2e") / "interactions.jsonl", model_cache)
    yield server
    server.stop()


def chat(client: openai.OpenAI, text: str, stream: bool) -> tuple[str, Any]:
    """Ask one question; the answer's text and the response headers."""
    messages: Any = [{"role": "user", "content": text}]
    raw = client.chat.completions.with_raw_response.create(
        model="local", messages=messages, max_tokens=12, temperature=0, stream=stream
    )
    if stream:
        chunks = list(raw.parse())
        assert chunks, "an empty stream"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    else:
        text = raw.parse().choices[0].message.content or ""
    return text, raw.headers


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_on_topic_reaches_the_llm(proxy: Guardrail, llama: LlamaServer, stream: bool) -> None:
    before = upstream_chats(llama)
    answer, headers = chat(proxy.client(), ON_TOPIC, stream)
    assert headers["x-guardrail-verdict"] == "passed"
    assert headers["x-guardrail-layer"] == "similarity"
    assert float(headers["x-guardrail-score"]) > 0
    assert "viewing" in headers["x-guardrail-scenario"]
    assert answer.strip() and answer != DEFAULT_REFUSAL
    assert upstream_chats(llama) == before + 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_off_topic_is_refused_without_calling_the_llm(
    proxy: Guardrail, llama: LlamaServer, stream: bool
) -> None:
    before = upstream_chats(llama)
    answer, headers = chat(proxy.client(), OFF_TOPIC, stream)
    assert answer == DEFAULT_REFUSAL
    assert headers["x-guardrail-verdict"] == "blocked"
    assert float(headers["x-guardrail-score"]) < 0.5
    assert upstream_chats(llama) == before


def test_models_pass_through(proxy: Guardrail, llama: LlamaServer) -> None:
    through = [m.id for m in proxy.client().models.list()]
    direct = httpx.get(f"{llama.base_url}/v1/models", headers={"authorization": f"Bearer {API_KEY}"})
    assert through == [m["id"] for m in direct.json()["data"]]
    assert through == [llama.model_id]


def test_the_authorization_header_reaches_the_llm(proxy: Guardrail, llama: LlamaServer) -> None:
    # The upstream checks the key: a wrong one is refused by it, and its 401 comes back as it was.
    with pytest.raises(openai.AuthenticationError):
        chat(proxy.client(api_key="sk-wrong"), ON_TOPIC, stream=False)
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key="sk-wrong").models.list()


def test_a_follow_up_is_judged_with_the_previous_turn(proxy: Guardrail) -> None:
    messages: Any = [
        {"role": "user", "content": "Are there flats near the station that allow pets?"},
        {"role": "assistant", "content": "Yes, two: one on Mill Road and one on Station Square."},
        {"role": "user", "content": "is the second one still available?"},
    ]
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="local", messages=messages, max_tokens=8
    )
    assert raw.headers["x-guardrail-verdict"] == "passed"
    assert raw.parse().choices[0].message.content != DEFAULT_REFUSAL


def test_shadow_mode_lets_off_topic_through_and_says_so(
    llama: LlamaServer, model_cache: Path, tmp_path: Path
) -> None:
    shadow = Guardrail(llama.base_url, tmp_path / "shadow.jsonl", model_cache, "--mode", "shadow")
    try:
        before = upstream_chats(llama)
        answer, headers = chat(shadow.client(), OFF_TOPIC, stream=True)
        assert headers["x-guardrail-verdict"] == "would-block"
        assert upstream_chats(llama) == before + 1
        metrics = httpx.get(f"{shadow.base_url}/metrics").text
        assert (
            'guardrail_requests_total{layer="similarity",scenario="real_estate",verdict="would-block"} 1.0'
            in (metrics)
        )
    finally:
        records = shadow.stop()
    assert [r["verdict"] for r in records] == ["would-block"]
    assert records[0]["reply"] == answer


def test_the_log_has_one_line_per_request_and_no_secrets(
    llama: LlamaServer, model_cache: Path, tmp_path: Path
) -> None:
    server = Guardrail(llama.base_url, tmp_path / "log.jsonl", model_cache)
    try:
        sent = []
        for text, stream in [(ON_TOPIC, False), (OFF_TOPIC, False), (ON_TOPIC + " Please", True)]:
            answer, headers = chat(server.client(), text, stream)
            sent.append((headers["x-guardrail-id"], text, headers["x-guardrail-verdict"], answer))
    finally:
        records = server.stop()
    assert API_KEY not in (tmp_path / "log.jsonl").read_text()
    assert [(r["id"], r["text"], r["verdict"], r["reply"]) for r in records] == sent
    passed = records[0]
    assert passed["upstream"]["status"] == 200
    assert passed["upstream"]["usage"]["completion_tokens"] > 0  # llama.cpp reports usage when not streamed
    assert passed["nearest_scenario"] and passed["score"] > passed["threshold"]
    assert passed["latency_ms"]["upstream_first_byte"] > 0
    assert passed["latency_ms"]["total"] >= passed["latency_ms"]["upstream_first_byte"]
    blocked = records[1]
    assert blocked["upstream"]["status"] is None and blocked["reply"] == DEFAULT_REFUSAL


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus scrape."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def test_the_metrics_count_tokens_used_and_saved_against_the_real_llm(
    llama: LlamaServer, model_cache: Path, tmp_path: Path
) -> None:
    prices = '{"local": {"input": 1.0, "output": 2.0}}'  # USD per million tokens
    server = Guardrail(llama.base_url, tmp_path / "log.jsonl", model_cache, "--prices", prices)
    try:
        _, passed = chat(server.client(), ON_TOPIC, stream=False)  # non-streamed: llama.cpp reports usage
        _, blocked = chat(server.client(), OFF_TOPIC, stream=False)
        assert (passed["x-guardrail-verdict"], blocked["x-guardrail-verdict"]) == ("passed", "blocked")
        scrape = httpx.get(f"{server.base_url}/metrics").text
        ready = httpx.get(f"{server.base_url}/readyz")
    finally:
        records = server.stop()
    usage = records[0]["upstream"]["usage"]
    used = usage["prompt_tokens"] + usage["completion_tokens"]
    assert metric(scrape, "guardrail_upstream_tokens_total") == used
    assert metric(scrape, "guardrail_upstream_cost_usd_total") == pytest.approx(
        (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    )
    saved = records[1]["saved"]
    assert saved["layer"] == "similarity" and not saved["shadow"]
    assert saved["prompt_tokens"] > 0 and saved["completion_tokens"] > 0
    assert metric(scrape, "guardrail_tokens_saved_total") == pytest.approx(
        saved["prompt_tokens"] + saved["completion_tokens"]
    )
    assert saved["usd"] > 0
    assert metric(scrape, "guardrail_cost_saved_usd_total") == pytest.approx(saved["usd"])
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
