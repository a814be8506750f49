"""Layer 2 end to end: the instruction reaches the LLM, and its refusals are logged and counted.

The proxy runs in a real uvicorn server in front of the fake OpenAI upstream, which records what it
received; the middleware wraps a small chatbot app that records what it received and answers with a
reply the test chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from guardrail.gate import Action, Decision, Gate
from guardrail.guard import Guard, Verdict
from guardrail.interactions import InteractionLog, read_interactions
from guardrail.layers.instruction import build_instruction
from guardrail.metrics import Metrics
from guardrail.middleware import GuardrailMiddleware
from guardrail.protocols import Conversation, JSONFields, OpenAIChat
from guardrail.settings import DEFAULT_INSTRUCTION, DEFAULT_REFUSAL, Settings

from samples import OFF_TOPIC, ON_TOPIC
from upstreams import UPSTREAM_REPLY, FakeOpenAI, ProxyServer, serve, sse_chunks

MODEL = "gpt-test"
ON = ON_TOPIC[0]
OFF = OFF_TOPIC[2]
OWNER_PROMPT = "You are Ava, the agency's assistant. Be brief."
# How a model typically writes the sentence it was told to answer with.
LLM_REFUSAL = "\u201c" + DEFAULT_REFUSAL.replace("'", "\u2019") + "\u201d I can help with our listings."

StartProxy = Callable[..., ProxyServer]


@pytest.fixture
def instruction(guard: Guard) -> str:
    """The instruction the default settings give the real-estate guard."""
    return build_instruction(guard.document, DEFAULT_INSTRUCTION, DEFAULT_REFUSAL)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def post(proxy: ProxyServer, messages: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, **extra}
    response = proxy.http().post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


# The proxy: what the upstream receives ------------------------------------------------------------


def test_a_passed_request_reaches_the_upstream_with_the_instruction_first(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, instruction: str
) -> None:
    response = post(proxy, user(ON), temperature=0.2)

    assert response.headers["x-guardrail-verdict"] == "passed"
    assert response.json()["choices"][0]["message"]["content"] == UPSTREAM_REPLY
    [arrived] = fake_upstream.chats
    assert arrived.json() == {
        "model": MODEL,
        "messages": [{"role": "system", "content": instruction}, *user(ON)],
        "temperature": 0.2,
    }
    # The length is the injected body's, not the client's.
    assert arrived.header("content-length") == str(len(arrived.body))
    record = proxy.record(response.headers["x-guardrail-id"])
    assert record["instruction"] is True
    assert record["llm_refused"] is False


@pytest.mark.parametrize("role", ["system", "developer"])
def test_the_owners_system_message_keeps_its_text_with_the_instruction_after_it(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, instruction: str, role: str
) -> None:
    post(proxy, [{"role": role, "content": OWNER_PROMPT}, *user(ON)])

    [arrived] = fake_upstream.chats
    assert arrived.json()["messages"] == [
        {"role": role, "content": f"{OWNER_PROMPT}\n\n{instruction}"},
        *user(ON),
    ]


def test_a_custom_template_and_refusal_reach_the_upstream(
    start_proxy: StartProxy, fake_upstream: FakeOpenAI
) -> None:
    proxy = start_proxy(
        fake_upstream.url, instruction_template="Topic: {title}. Else: {refusal}", refusal="Not here."
    )

    post(proxy, user(ON))

    [arrived] = fake_upstream.chats
    assert arrived.json()["messages"][0] == {
        "role": "system",
        "content": "Topic: Real Estate Agency Assistant. Else: Not here.",
    }


@pytest.mark.parametrize(
    ("overrides", "message", "verdict"),
    [
        ({"mode": "shadow"}, ON, "passed"),
        ({"mode": "shadow"}, OFF, "would-block"),
        ({"instruction": False}, ON, "passed"),
    ],
    ids=["shadow-passed", "shadow-would-block", "instruction-off"],
)
def test_without_layer_2_the_upstream_gets_the_body_as_it_came(
    start_proxy: StartProxy,
    fake_upstream: FakeOpenAI,
    overrides: dict[str, Any],
    message: str,
    verdict: str,
) -> None:
    proxy = start_proxy(fake_upstream.url, **overrides)
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "system", "content": "Hi."}, *user(message)]})

    response = proxy.http().post("/v1/chat/completions", content=body)

    assert response.headers["x-guardrail-verdict"] == verdict
    [arrived] = fake_upstream.chats
    assert arrived.body == body
    record = proxy.record(response.headers["x-guardrail-id"])
    assert record["instruction"] is False
    assert record["llm_refused"] is False


def test_an_unjudged_request_gets_no_instruction(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "assistant", "content": "Hello!"}]})

    response = proxy.http().post("/v1/chat/completions", content=body)

    assert response.headers["x-guardrail-verdict"] == "unjudged"
    [arrived] = fake_upstream.chats
    assert arrived.body == body
    assert proxy.record(response.headers["x-guardrail-id"])["instruction"] is False


# The proxy: the LLM's refusals --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_from_the_llm_is_logged_and_counted(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, stream: bool
) -> None:
    fake_upstream.reset(reply=LLM_REFUSAL)
    assert proxy.metric("guardrail_llm_refusals_total", scenario="real_estate") == 0

    raw = proxy.sdk().chat.completions.with_raw_response.create(model=MODEL, messages=user(ON), stream=stream)
    if stream:
        reply = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        reply = raw.parse().choices[0].message.content or ""

    assert reply == LLM_REFUSAL  # relayed as the LLM wrote it
    record = proxy.record(raw.headers["x-guardrail-id"])
    assert (record["verdict"], record["instruction"], record["llm_refused"]) == ("passed", True, True)
    assert record["reply"] == LLM_REFUSAL
    assert proxy.metric("guardrail_llm_refusals_total", scenario="real_estate") == 1


def test_a_streamed_refusal_is_relayed_as_it_comes(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    pause = 0.5
    fake_upstream.reset(reply=DEFAULT_REFUSAL, pause=pause)

    started = time.monotonic()
    stream = proxy.sdk().chat.completions.with_raw_response.create(
        model=MODEL, messages=user(ON), stream=True
    )
    arrivals = [
        (time.monotonic() - started, c.choices[0].delta.content)
        for c in stream.parse()
        if c.choices and c.choices[0].delta.content
    ]

    # The first word arrives while the upstream is still pausing: nothing waits for the detector.
    assert arrivals[0][0] < pause <= arrivals[-1][0]
    record = proxy.record(stream.headers["x-guardrail-id"])
    assert record["llm_refused"] is True


def test_a_blocked_request_is_not_an_llm_refusal(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    response = post(proxy, user(OFF))

    assert response.json()["choices"][0]["message"]["content"] == DEFAULT_REFUSAL
    record = proxy.record(response.headers["x-guardrail-id"])
    assert (record["verdict"], record["instruction"], record["llm_refused"]) == ("blocked", False, None)
    assert proxy.metric("guardrail_llm_refusals_total", scenario="real_estate") == 0


def test_an_upstream_error_has_no_reply_to_judge(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    fake_upstream.reset(fail=500)

    response = proxy.http().post("/v1/chat/completions", json={"model": MODEL, "messages": user(ON)})

    assert response.status_code == 500
    record = proxy.record(response.headers["x-guardrail-id"])
    assert (record["instruction"], record["llm_refused"]) == (True, None)


def test_the_record_carries_each_layers_score(proxy: ProxyServer, guard: Guard) -> None:
    response = post(proxy, user(ON))

    record = proxy.record(response.headers["x-guardrail-id"])
    assert record["similarity_score"] == pytest.approx(guard.judge(ON).score, abs=1e-4)
    assert record["classifier_score"] is None  # no classifier loaded


# The middleware ------------------------------------------------------------------------------------


@dataclass
class Chatbot:
    """An app in both wire formats that records what it received and answers with ``reply``."""

    reply: str = "Yes, the flat is still available."
    bodies: list[bytes] = field(default_factory=list)
    lengths: list[str | None] = field(default_factory=list)

    def app(self) -> Starlette:
        async def completions(request: Request) -> Response:
            payload = await self._seen(request)
            if payload.get("stream"):
                return StreamingResponse(iter(sse_chunks(self.reply)), media_type="text/event-stream")
            message = {"role": "assistant", "content": self.reply}
            return JSONResponse({"object": "chat.completion", "choices": [{"index": 0, "message": message}]})

        async def chat(request: Request) -> Response:
            await self._seen(request)
            return JSONResponse({"reply": self.reply})

        routes = [
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/chat", chat, methods=["POST"]),
        ]
        return Starlette(routes=routes)

    async def _seen(self, request: Request) -> Any:
        body = await request.body()
        self.bodies.append(body)
        self.lengths.append(request.headers.get("content-length"))
        return orjson.loads(body)


@dataclass
class Guarded:
    url: str
    chatbot: Chatbot
    log_path: Path
    registry: CollectorRegistry

    def record(self, timeout: float = 5.0) -> dict[str, Any]:
        """The one interaction record, once the log's writer thread has written it."""
        deadline = time.monotonic() + timeout
        while not (self.log_path.exists() and self.log_path.read_bytes().strip()):
            assert time.monotonic() < deadline, "no interaction record"
            time.sleep(0.01)
        [line] = self.log_path.read_bytes().splitlines()
        record: dict[str, Any] = orjson.loads(line)
        return record

    def refusals(self) -> float | None:
        return self.registry.get_sample_value("guardrail_llm_refusals_total", {"scenario": "real_estate"})


@pytest.fixture
def guarded(guard: Guard, tmp_path: Path) -> Iterator[Callable[..., Guarded]]:
    """Serve the chatbot behind the middleware with settings overrides; the log is read after."""

    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> Guarded:
            chatbot = Chatbot()
            log_path = tmp_path / "interactions.jsonl"
            registry = CollectorRegistry()
            app = GuardrailMiddleware(
                chatbot.app(),
                guard=guard,
                paths={"/v1/chat/completions": OpenAIChat(), "/chat": JSONFields("message", "reply")},
                settings=Settings(log_path=log_path, **overrides),
                metrics=Metrics(registry),
            )
            return Guarded(stack.enter_context(serve(app)), chatbot, log_path, registry)

        yield start


def test_the_middleware_gives_the_app_the_instruction_with_a_matching_length(
    guarded: Callable[..., Guarded], instruction: str
) -> None:
    server = guarded()

    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": user(ON)})

    assert response.headers["x-guardrail-verdict"] == "passed"
    [body] = server.chatbot.bodies
    assert orjson.loads(body)["messages"] == [{"role": "system", "content": instruction}, *user(ON)]
    assert server.chatbot.lengths == [str(len(body))]


def test_the_middleware_in_shadow_mode_gives_the_app_the_body_as_it_came(
    guarded: Callable[..., Guarded],
) -> None:
    server = guarded(mode="shadow")
    body = orjson.dumps({"model": MODEL, "messages": user(ON)})

    httpx.post(f"{server.url}/v1/chat/completions", content=body)

    assert server.chatbot.bodies == [body]


@pytest.mark.parametrize("stream", [False, True])
def test_the_middleware_logs_and_counts_a_refusal_from_the_app(
    guarded: Callable[..., Guarded], stream: bool
) -> None:
    server = guarded()
    server.chatbot.reply = LLM_REFUSAL
    payload = {"model": MODEL, "messages": user(ON), "stream": stream}

    response = httpx.post(f"{server.url}/v1/chat/completions", json=payload)
    assert response.status_code == 200

    record = server.record()
    assert (record["instruction"], record["llm_refused"], record["reply"]) == (True, True, LLM_REFUSAL)
    assert server.refusals() == 1


def test_a_custom_json_api_gets_no_instruction_but_its_refusals_are_recognised(
    guarded: Callable[..., Guarded],
) -> None:
    server = guarded()
    server.chatbot.reply = DEFAULT_REFUSAL
    body = orjson.dumps({"message": ON})

    response = httpx.post(f"{server.url}/chat", content=body)

    assert response.json() == {"reply": DEFAULT_REFUSAL}
    assert server.chatbot.bodies == [body]
    record = server.record()
    assert (record["verdict"], record["instruction"], record["llm_refused"]) == ("passed", False, True)
    assert server.refusals() == 1


# The gate: who gets the instruction ---------------------------------------------------------------


def decision(action: Action) -> Decision:
    verdict = None
    if action != "unjudged":
        allowed = action == "passed"
        verdict = Verdict(allowed=allowed, score=0.5, threshold=0.1, layer="similarity", scenario="s")
    return Decision("gr-test", action, verdict, 0.0, time.perf_counter())


@pytest.fixture
def make_gate(guard: Guard) -> Iterator[Callable[..., Gate]]:
    gates: list[Gate] = []

    def make(**overrides: Any) -> Gate:
        gate = Gate.from_settings(guard, Settings(**overrides), metrics=Metrics(CollectorRegistry()))
        gates.append(gate)
        return gate

    yield make
    for gate in gates:
        gate.batcher.close()


@pytest.mark.parametrize(
    ("overrides", "action", "instructed"),
    [
        ({}, "passed", True),
        ({}, "unjudged", False),
        ({}, "blocked", False),
        ({"mode": "shadow"}, "passed", False),
        ({"mode": "shadow"}, "would-block", False),
        ({"instruction": False}, "passed", False),
    ],
)
def test_only_a_request_passed_in_enforce_mode_with_layer_2_on_is_instructed(
    make_gate: Callable[..., Gate], overrides: dict[str, Any], action: Action, instructed: bool
) -> None:
    gate = make_gate(**overrides)
    body = orjson.dumps({"messages": user(ON)})
    protocol = OpenAIChat()

    sent = gate.instruct(decision(action), protocol.parse(body), protocol, body)

    assert (sent is not body) is instructed
    if instructed:
        assert gate.instruction is not None
        assert orjson.loads(sent)["messages"][0] == {"role": "system", "content": gate.instruction}


def test_the_instruction_is_built_once_from_the_settings(
    make_gate: Callable[..., Gate], guard: Guard
) -> None:
    gate = make_gate(instruction_template="{title}: {refusal}", refusal="No.")

    assert gate.instruction == f"{guard.document.title}: No."
    assert make_gate(instruction=False).instruction is None


def test_the_record_judges_only_a_reply_the_llm_wrote(guard: Guard, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    log = InteractionLog(tmp_path / "interactions.jsonl")
    log.start()
    gate = Gate(guard, log=log, metrics=Metrics(registry), instruction="Stay on topic.")
    conversation = Conversation(text=ON)
    try:
        gate.record(decision("passed"), conversation, "/c", reply=DEFAULT_REFUSAL.upper(), instructed=True)
        gate.record(decision("passed"), conversation, "/c", reply="Sure, here it is.", instructed=True)
        gate.record(decision("passed"), conversation, "/c", reply=None, instructed=True)
        gate.record(decision("blocked"), conversation, "/c", reply=DEFAULT_REFUSAL)
    finally:
        gate.batcher.close()
        log.close()
    records = list(read_interactions([tmp_path / "interactions.jsonl"]))

    assert [r["llm_refused"] for r in records] == [True, False, None, None]
    assert [r["instruction"] for r in records] == [True, True, True, False]
    assert registry.get_sample_value("guardrail_llm_refusals_total", {"scenario": "real_estate"}) == 1


def test_the_refusal_counter_exists_before_the_first_refusal(make_gate: Callable[..., Gate]) -> None:
    gate = make_gate()

    value = gate.metrics.registry.get_sample_value(
        "guardrail_llm_refusals_total", {"scenario": "real_estate"}
    )

    assert value == 0


def test_concurrent_refusals_are_each_counted(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    fake_upstream.reset(reply=DEFAULT_REFUSAL)

    async def ask(n: int) -> list[Any]:
        async with proxy.async_sdk() as client:
            create = client.chat.completions.with_raw_response.create
            return await asyncio.gather(*(create(model=MODEL, messages=user(ON)) for _ in range(n)))

    responses = asyncio.run(ask(8))

    # The counter goes up before the record is queued: once all eight are logged, all are counted.
    assert all(proxy.record(r.headers["x-guardrail-id"])["llm_refused"] for r in responses)
    assert proxy.metric("guardrail_llm_refusals_total", scenario="real_estate") == 8
