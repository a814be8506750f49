from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from prometheus_client import CollectorRegistry

from guardrail.accounting import DEFAULT_COMPLETION_TOKENS, PromptSize, TokenEstimator
from guardrail.gate import RECORD_DELAY, Action, Decision, Gate
from guardrail.guard import Guard, Layer, Verdict
from guardrail.interactions import InteractionLog, read_interactions
from guardrail.metrics import Metrics
from guardrail.prices import Price, PriceTable
from guardrail.protocols.base import Conversation
from guardrail.protocols.openai import OpenAIChat
from guardrail.settings import DEFAULT_REFUSAL, Settings

from classifiers import write_classifier
from samples import OFF_TOPIC, ON_TOPIC

RECORD_KEYS = {
    "id",
    "time",
    "scenario",
    "mode",
    "path",
    "model",
    "stream",
    "text",
    "context",
    "verdict",
    "layer",
    "score",
    "threshold",
    "nearest_scenario",
    "followup",
    "used_context",
    "similarity_score",
    "classifier_score",
    "classifier",
    "sentence",
    "upstream",
    "reply",
    "instruction",
    "llm_refused",
    "prompt_chars",
    "prompt_messages",
    "saved",
    "latency_ms",
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def make_gate(guard: Guard, metrics: Metrics, **kwargs: object) -> Gate:
    return Gate(guard, metrics=metrics, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def gate(guard: Guard, metrics: Metrics) -> Iterator[Gate]:
    gate = make_gate(guard, metrics)
    yield gate
    gate.batcher.close()


@contextlib.contextmanager
def logging_gate(guard: Guard, metrics: Metrics, path: Path, **kwargs: object) -> Iterator[Gate]:
    """A gate writing to a started log at ``path``; on leaving, its batcher and log close, so every
    record is in the file."""
    log = InteractionLog(path)
    log.start()
    gate = make_gate(guard, metrics, log=log, **kwargs)
    try:
        yield gate
    finally:
        gate.batcher.close()
        log.close()


def decide(gate: Gate, conversation: Conversation) -> Decision:
    return asyncio.run(gate.decide(conversation))


def requests(registry: CollectorRegistry, verdict: str, layer: str, scenario: str) -> float | None:
    labels = {"verdict": verdict, "layer": layer, "scenario": scenario}
    return registry.get_sample_value("guardrail_requests_total", labels)


def verdict(score: float = 0.123456, scenario: str = "Booking a viewing", allowed: bool = False) -> Verdict:
    return Verdict(allowed=allowed, score=score, threshold=0.06, layer="similarity", scenario=scenario)


# --- decide --------------------------------------------------------------------------------------


def test_on_topic_passes(gate: Gate, registry: CollectorRegistry) -> None:
    decision = decide(gate, Conversation(text=ON_TOPIC[0]))
    assert decision.action == "passed"
    assert not decision.blocked
    assert decision.verdict is not None
    assert decision.verdict.allowed
    assert decision.id.startswith("gr-")
    assert decision.guard_seconds > 0
    assert registry.get_sample_value("guardrail_guard_seconds_count") == 1


def test_off_topic_is_blocked(gate: Gate) -> None:
    decision = decide(gate, Conversation(text=OFF_TOPIC[0]))
    assert decision.action == "blocked"
    assert decision.blocked
    assert decision.verdict is not None
    assert not decision.verdict.allowed


def test_shadow_mode_would_block_but_does_not(guard: Guard, metrics: Metrics) -> None:
    gate = make_gate(guard, metrics, mode="shadow")
    try:
        off = decide(gate, Conversation(text=OFF_TOPIC[0]))
        on = decide(gate, Conversation(text=ON_TOPIC[0]))
    finally:
        gate.batcher.close()
    assert off.action == "would-block"
    assert not off.blocked
    assert on.action == "passed"


def test_no_text_is_unjudged(gate: Gate, registry: CollectorRegistry) -> None:
    decision = decide(gate, Conversation(text=None, previous=ON_TOPIC[0]))
    assert decision.action == "unjudged"
    assert decision.verdict is None
    assert decision.guard_seconds == 0.0
    assert not decision.blocked
    assert gate.batcher.items == 0  # the encoder was not asked
    assert registry.get_sample_value("guardrail_guard_seconds_count") == 0


def test_a_follow_up_is_judged_with_the_previous_turn(gate: Gate) -> None:
    alone = decide(gate, Conversation(text="is it still available?"))
    with_context = decide(gate, Conversation(text="is it still available?", previous=ON_TOPIC[0]))
    assert alone.action == "blocked"
    assert with_context.action == "passed"
    assert with_context.verdict is not None
    assert with_context.verdict.context


def test_every_decision_has_its_own_id(gate: Gate) -> None:
    ids = {decide(gate, Conversation(text=ON_TOPIC[0])).id for _ in range(3)}
    assert len(ids) == 3


def test_concurrent_decisions_share_batches(gate: Gate) -> None:
    async def main() -> list[Decision]:
        texts = ON_TOPIC + OFF_TOPIC
        return await asyncio.gather(*(gate.decide(Conversation(text=t)) for t in texts))

    decisions = asyncio.run(main())
    assert [d.action for d in decisions] == ["passed"] * len(ON_TOPIC) + ["blocked"] * len(OFF_TOPIC)
    assert gate.batcher.items == len(decisions)
    assert gate.batcher.batches < len(decisions)


# --- headers -------------------------------------------------------------------------------------


def test_headers_name_the_decision() -> None:
    headers = dict(Decision("gr-abc", "blocked", verdict(0.123456), 0.01, 0.0).headers())
    assert headers == {
        b"x-guardrail-id": b"gr-abc",
        b"x-guardrail-verdict": b"blocked",
        b"x-guardrail-layer": b"similarity",
        b"x-guardrail-score": b"0.1235",
        b"x-guardrail-scenario": b"Booking a viewing",
    }


@pytest.mark.parametrize(("score", "text"), [(-0.05604, b"-0.0560"), (1.0, b"1.0000"), (0.0, b"0.0000")])
def test_score_has_four_decimals(score: float, text: bytes) -> None:
    headers = dict(Decision("gr-1", "passed", verdict(score), 0.0, 0.0).headers())
    assert headers[b"x-guardrail-score"] == text


def test_an_ascii_scenario_keeps_its_punctuation() -> None:
    scenario = "Booking, rescheduling or cancelling a viewing (or open house); fees & costs: 5/5 'ok'"
    headers = dict(Decision("gr-1", "passed", verdict(scenario=scenario), 0.0, 0.0).headers())
    assert headers[b"x-guardrail-scenario"] == scenario.encode()


@pytest.mark.parametrize(
    "scenario",
    ["Besichtigung buchen — Wohnung", "物件の内見予約", "Crédit immobilier", "Line\r\nbreak: injected"],
)
def test_a_non_ascii_scenario_is_percent_encoded(scenario: str) -> None:
    headers = dict(Decision("gr-1", "passed", verdict(scenario=scenario), 0.0, 0.0).headers())
    value = headers[b"x-guardrail-scenario"]
    assert value.isascii()
    assert b"\r" not in value and b"\n" not in value
    assert unquote(value.decode()) == scenario


def test_unjudged_headers() -> None:
    headers = dict(Decision("gr-1", "unjudged", None, 0.0, 0.0).headers())
    assert headers[b"x-guardrail-verdict"] == b"unjudged"
    assert headers[b"x-guardrail-layer"] == b"none"
    assert headers[b"x-guardrail-score"] == b"none"
    assert headers[b"x-guardrail-scenario"] == b""


def test_headers_are_lower_case_ascii(gate: Gate) -> None:
    for name, value in decide(gate, Conversation(text=ON_TOPIC[1])).headers():
        assert name == name.lower()
        assert name.startswith(b"x-guardrail-")
        assert value.isascii()


# --- record --------------------------------------------------------------------------------------


def test_record_writes_one_interaction_and_counts_it(
    guard: Guard, metrics: Metrics, registry: CollectorRegistry, tmp_path: Path
) -> None:
    conversation = Conversation(
        text="is it still available?", previous=ON_TOPIC[0], stream=True, model="gpt-x", include_usage=True
    )
    with logging_gate(guard, metrics, tmp_path / "interactions.jsonl") as gate:
        decision = decide(gate, conversation)
        gate.record(
            decision,
            conversation,
            "/v1/chat/completions",
            status=200,
            usage={"total_tokens": 15},
            reply="Yes, it is.",
            upstream_seconds=0.25,
        )
    [record] = list(read_interactions([tmp_path / "interactions.jsonl"]))
    assert set(record) == RECORD_KEYS
    assert decision.verdict is not None
    assert record["id"] == decision.id
    assert record["scenario"] == "real_estate"
    assert record["mode"] == "enforce"
    assert record["path"] == "/v1/chat/completions"
    assert record["model"] == "gpt-x"
    assert record["stream"] is True
    assert record["text"] == "is it still available?"
    assert record["context"] == ON_TOPIC[0]
    assert record["verdict"] == "passed"
    assert record["layer"] == "similarity"
    assert record["score"] == pytest.approx(decision.verdict.score, abs=1e-6)
    assert record["threshold"] == pytest.approx(guard.threshold, abs=1e-6)
    assert record["nearest_scenario"] in guard.document.scenarios
    assert record["followup"] is True
    assert record["used_context"] is True
    assert record["upstream"] == {"status": 200, "usage": {"total_tokens": 15}, "error": None}
    assert record["reply"] == "Yes, it is."
    assert set(record["latency_ms"]) == {"guard", "upstream_first_byte", "total"}
    assert record["latency_ms"]["upstream_first_byte"] == 250.0
    assert record["latency_ms"]["total"] >= record["latency_ms"]["guard"] > 0
    assert record["time"].endswith("+00:00")
    assert requests(registry, "passed", "similarity", "real_estate") == 1
    assert requests(registry, "blocked", "similarity", "real_estate") is None
    assert registry.get_sample_value("guardrail_log_dropped_records_total") == 0


def test_record_of_an_unjudged_request(
    guard: Guard, metrics: Metrics, registry: CollectorRegistry, tmp_path: Path
) -> None:
    conversation = Conversation(text=None)
    with logging_gate(guard, metrics, tmp_path / "interactions.jsonl", mode="shadow") as gate:
        decision = decide(gate, conversation)
        gate.record(decision, conversation, "/chat/completions", status=502, error="unreachable")
    [record] = list(read_interactions([tmp_path / "interactions.jsonl"]))
    assert set(record) == RECORD_KEYS
    assert record["mode"] == "shadow"
    assert record["verdict"] == "unjudged"
    assert record["text"] is None
    assert (record["layer"], record["score"], record["threshold"], record["nearest_scenario"]) == (
        None,
        None,
        None,
        None,
    )
    assert (record["followup"], record["used_context"]) == (False, False)
    assert record["upstream"] == {"status": 502, "usage": None, "error": "unreachable"}
    assert record["latency_ms"]["upstream_first_byte"] is None
    assert requests(registry, "unjudged", "none", "real_estate") == 1


def test_record_counts_every_verdict(gate: Gate, registry: CollectorRegistry) -> None:
    for text in (ON_TOPIC[0], ON_TOPIC[1], OFF_TOPIC[0]):
        conversation = Conversation(text=text)
        gate.record(decide(gate, conversation), conversation, "/v1/chat/completions")
    assert requests(registry, "passed", "similarity", "real_estate") == 2
    assert requests(registry, "blocked", "similarity", "real_estate") == 1


def test_record_without_a_log_only_counts(gate: Gate, registry: CollectorRegistry) -> None:
    assert gate.log is None
    conversation = Conversation(text=OFF_TOPIC[1])
    gate.record(decide(gate, conversation), conversation, "/v1/chat/completions")
    assert requests(registry, "blocked", "similarity", "real_estate") == 1


def test_on_the_event_loop_a_record_waits_a_moment(gate: Gate, registry: CollectorRegistry) -> None:
    conversation = Conversation(text=ON_TOPIC[3])

    async def serve() -> tuple[float | None, float | None]:
        decision = await gate.decide(conversation)
        await asyncio.sleep(0.05)  # the request's own time, before it ends
        gate.record(decision, conversation, "/v1/chat/completions")
        at_once = requests(registry, "passed", "similarity", "real_estate")
        await asyncio.sleep(RECORD_DELAY * 5)
        return at_once, requests(registry, "passed", "similarity", "real_estate")

    at_once, later = asyncio.run(serve())
    assert at_once is None
    assert later == 1
    # The latency is the request's, not the wait for the record.
    labels = {"verdict": "passed"}
    assert 0.05 <= registry.get_sample_value("guardrail_request_seconds_sum", labels) < 0.05 + RECORD_DELAY


def test_a_record_waiting_on_a_closed_loop_is_written_by_the_next(
    guard: Guard, metrics: Metrics, registry: CollectorRegistry, tmp_path: Path
) -> None:
    """A loop that ends within the delay (a test client's) does not strand its records."""
    conversations = [Conversation(text=ON_TOPIC[4]), Conversation(text=OFF_TOPIC[2])]

    async def one(conversation: Conversation) -> None:
        gate.record(await gate.decide(conversation), conversation, "/v1/chat/completions")

    with logging_gate(guard, metrics, tmp_path / "interactions.jsonl") as gate:
        asyncio.run(one(conversations[0]))  # its loop closes before the delay is up
        assert requests(registry, "passed", "similarity", "real_estate") is None
        asyncio.run(one(conversations[1]))
        time.sleep(RECORD_DELAY)
        gate.flush()  # what a scrape and shutdown do; the second loop's timer has gone with it
    assert requests(registry, "passed", "similarity", "real_estate") == 1
    assert requests(registry, "blocked", "similarity", "real_estate") == 1
    assert [r["text"] for r in read_interactions([tmp_path / "interactions.jsonl"])] == [
        c.text for c in conversations
    ]


def test_a_failing_record_does_not_cost_the_others(
    gate: Gate, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    good = Conversation(text=ON_TOPIC[5])
    bad = Conversation(text=ON_TOPIC[6])

    async def serve() -> None:
        gate.record(await gate.decide(bad), bad, "/v1/chat/completions", usage="not a dict")  # type: ignore[arg-type]
        gate.record(await gate.decide(good), good, "/v1/chat/completions")
        gate.flush()

    asyncio.run(serve())
    assert requests(registry, "passed", "similarity", "real_estate") is not None
    assert "recording request" in caplog.text


def test_a_dropped_record_is_counted(
    guard: Guard, metrics: Metrics, registry: CollectorRegistry, tmp_path: Path
) -> None:
    log = InteractionLog(tmp_path / "interactions.jsonl")
    log.close()  # a closed log refuses records
    gate = make_gate(guard, metrics, log=log)
    conversation = Conversation(text=ON_TOPIC[2])
    try:
        gate.record(decide(gate, conversation), conversation, "/v1/chat/completions")
    finally:
        gate.batcher.close()
    assert registry.get_sample_value("guardrail_log_dropped_records_total") == 1
    assert requests(registry, "passed", "similarity", "real_estate") == 1
    assert not (tmp_path / "interactions.jsonl").exists()


def test_the_log_queue_depth_is_read_when_scraped(
    guard: Guard, metrics: Metrics, registry: CollectorRegistry, tmp_path: Path
) -> None:
    log = InteractionLog(tmp_path / "interactions.jsonl")  # not started: records wait in the queue
    gate = make_gate(guard, metrics, log=log)
    conversation = Conversation(text=ON_TOPIC[2])
    try:
        for _ in range(2):
            gate.record(decide(gate, conversation), conversation, "/v1/chat/completions")
        assert registry.get_sample_value("guardrail_log_queue_depth") == 2
        log.start()
        log.close()  # written out
        assert registry.get_sample_value("guardrail_log_queue_depth") == 0  # no request since
    finally:
        gate.batcher.close()
    gate.log = None
    assert registry.get_sample_value("guardrail_log_queue_depth") == 0


def test_gate_defaults(guard: Guard) -> None:
    gate = Gate(guard)
    try:
        assert gate.mode == "enforce"
        assert gate.scenario == "real_estate"
        assert gate.log is None
        assert gate.refusal.strip()
        assert gate.metrics.registry is not None
    finally:
        gate.batcher.close()


# --- tokens, money and time ----------------------------------------------------------------------

PRICES = PriceTable.of({"gpt-x": Price(input=2.0, output=8.0)})  # USD per million tokens
USAGE = {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200}


def chat(text: str, model: str = "gpt-x", system: str | None = None) -> Conversation:
    """A parsed chat request, as the proxy and the middleware have it."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return OpenAIChat().parse(json.dumps({"model": model, "messages": messages}).encode())


def decision(action: Action, layer: Layer = "similarity") -> Decision:
    """A decision made just now, without asking the encoder."""
    judged = Verdict(allowed=action == "passed", score=0.1, threshold=0.06, layer=layer, scenario="Viewing")
    return Decision("gr-1", action, None if action == "unjudged" else judged, 0.001, time.perf_counter())


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    assert found is not None, (name, labels)
    return found


def saved(registry: CollectorRegistry, layer: str, shadow: bool = False) -> tuple[float, float, float]:
    """(prompt tokens, completion tokens, USD) counted as saved by ``layer`` (or would-save)."""
    tokens = "guardrail_tokens_would_save_total" if shadow else "guardrail_tokens_saved_total"
    cost = "guardrail_cost_would_save_usd_total" if shadow else "guardrail_cost_saved_usd_total"
    return (
        value(registry, tokens, layer=layer, kind="prompt"),
        value(registry, tokens, layer=layer, kind="completion"),
        value(registry, cost, layer=layer),
    )


def upstream(registry: CollectorRegistry) -> tuple[float, float, float]:
    return (
        value(registry, "guardrail_upstream_tokens_total", kind="prompt"),
        value(registry, "guardrail_upstream_tokens_total", kind="completion"),
        value(registry, "guardrail_upstream_cost_usd_total"),
    )


@pytest.fixture
def priced(guard: Guard, metrics: Metrics) -> Iterator[Gate]:
    gate = make_gate(guard, metrics, prices=PRICES, instruction="Stay on topic. " * 20)
    yield gate
    gate.batcher.close()


def test_a_passed_request_counts_what_the_upstream_used_and_saves_nothing(
    priced: Gate, registry: CollectorRegistry
) -> None:
    priced.record(decision("passed"), chat(ON_TOPIC[0]), "/v1/chat/completions", 200, USAGE, "Yes.")
    assert upstream(registry) == pytest.approx((120, 80, (120 * 2.0 + 80 * 8.0) / 1e6))
    for layer in ("similarity", "classifier", "instruction"):
        assert saved(registry, layer) == (0, 0, 0)
        assert saved(registry, layer, shadow=True) == (0, 0, 0)
    assert value(registry, "guardrail_request_seconds_count", verdict="passed") == 1
    assert value(registry, "guardrail_request_seconds_count", verdict="blocked") == 0


def test_a_blocked_request_saves_its_prompt_and_an_answer(priced: Gate, registry: CollectorRegistry) -> None:
    conversation = chat("What's the weather in Lisbon?", system="You are a helpful estate agent.")
    priced.record(decision("blocked"), conversation, "/v1/chat/completions", reply=DEFAULT_REFUSAL)
    expected = priced.accounting.estimator.prompt_tokens("gpt-x", PromptSize(60, 2, True, False))
    assert expected == pytest.approx(3 + 4 * 2 + 60 / 4)  # the defaults: no upstream data yet
    prompt, completion, usd = saved(registry, "similarity")
    assert prompt == pytest.approx(expected)
    assert completion == DEFAULT_COMPLETION_TOKENS
    assert usd == pytest.approx((expected * 2.0 + completion * 8.0) / 1e6)
    assert saved(registry, "similarity", shadow=True) == (0, 0, 0)
    assert upstream(registry) == (0, 0, 0)
    assert value(registry, "guardrail_request_seconds_count", verdict="blocked") == 1


def test_a_block_by_the_classifier_is_the_classifiers_saving(
    priced: Gate, registry: CollectorRegistry
) -> None:
    priced.record(decision("blocked", layer="classifier"), chat("Tell me a joke"), "/v1/chat/completions")
    assert saved(registry, "classifier")[1] == DEFAULT_COMPLETION_TOKENS
    assert saved(registry, "similarity") == (0, 0, 0)


def test_an_unpriced_model_saves_tokens_but_no_money(priced: Gate, registry: CollectorRegistry) -> None:
    priced.record(decision("blocked"), chat("Tell me a joke", model="mystery"), "/v1/chat/completions")
    prompt, completion, usd = saved(registry, "similarity")
    assert prompt > 0 and completion > 0
    assert usd == 0


def test_shadow_mode_counts_what_blocking_would_save_never_as_saved(
    guard: Guard, metrics: Metrics, registry: CollectorRegistry
) -> None:
    gate = make_gate(guard, metrics, mode="shadow", prices=PRICES)
    try:
        gate.record(
            decision("would-block"), chat("Tell me a joke"), "/v1/chat/completions", 200, USAGE, "Ha."
        )
    finally:
        gate.batcher.close()
    prompt, completion, usd = saved(registry, "similarity", shadow=True)
    assert prompt == pytest.approx(3 + 4 + len("Tell me a joke") / 4)
    assert completion == DEFAULT_COMPLETION_TOKENS
    assert usd == pytest.approx((prompt * 2.0 + completion * 8.0) / 1e6)
    assert saved(registry, "similarity") == (0, 0, 0)
    # It went upstream: what it used is real, and it teaches the estimator.
    assert upstream(registry)[:2] == (120, 80)
    assert gate.accounting.estimator.fit("gpt-x").observations == 1
    assert gate.accounting.estimator.completion_tokens("gpt-x") == 80
    assert value(registry, "guardrail_request_seconds_count", verdict="would-block") == 1


def test_a_refusal_by_the_llm_saves_the_rest_of_an_answer(priced: Gate, registry: CollectorRegistry) -> None:
    usage = {"prompt_tokens": 150, "completion_tokens": 14}
    priced.record(
        decision("passed"),
        chat(OFF_TOPIC[0]),
        "/v1/chat/completions",
        200,
        usage,
        DEFAULT_REFUSAL,
        instructed=True,
    )
    assert value(registry, "guardrail_llm_refusals_total", scenario="real_estate") == 1
    prompt, completion, usd = saved(registry, "instruction")
    assert prompt == 0  # the prompt was spent
    assert completion == DEFAULT_COMPLETION_TOKENS - 14
    assert usd == pytest.approx(completion * 8.0 / 1e6)
    assert saved(registry, "similarity") == (0, 0, 0)
    assert upstream(registry)[:2] == (150, 14)
    # A refusal is no answer: the mean answer length is not shortened by it.
    assert priced.accounting.estimator.completion_tokens("gpt-x") == DEFAULT_COMPLETION_TOKENS


def test_a_refusal_without_usage_is_estimated_from_its_text(
    priced: Gate, registry: CollectorRegistry
) -> None:
    priced.record(
        decision("passed"),
        chat(OFF_TOPIC[1]),
        "/v1/chat/completions",
        200,
        None,
        DEFAULT_REFUSAL,
        instructed=True,
    )
    completion = saved(registry, "instruction")[1]
    assert completion == pytest.approx(DEFAULT_COMPLETION_TOKENS - len(DEFAULT_REFUSAL) / 4)


def test_a_refusal_without_layer_2_is_not_the_guards_saving(
    priced: Gate, registry: CollectorRegistry
) -> None:
    # The app's own prompt may use the sentence: only a refusal after the instruction is layer 2's.
    priced.record(decision("passed"), chat(OFF_TOPIC[1]), "/v1/chat/completions", 200, USAGE, DEFAULT_REFUSAL)
    assert value(registry, "guardrail_llm_refusals_total", scenario="real_estate") == 1
    assert saved(registry, "instruction") == (0, 0, 0)


def test_calibration_samples_include_layer_2s_instruction(guard: Guard, registry: CollectorRegistry) -> None:
    instruction = "Only answer questions about our flats. " * 10
    gate = make_gate(guard, Metrics(registry), instruction=instruction, estimator=TokenEstimator())
    try:
        # An upstream that counts exactly the default model, for what it was sent: the client's system
        # message with the instruction after it.
        for text in ON_TOPIC:
            sent = len("Be brief.") + 2 + len(instruction) + len(text)
            usage = {"prompt_tokens": round(3 + 4 * 2 + sent / 4), "completion_tokens": 50}
            gate.record(
                decision("passed"), chat(text, system="Be brief."), "/v", 200, usage, "Sure.", instructed=True
            )
        conversation = chat(OFF_TOPIC[0], system="Be brief.")
        gate.record(decision("blocked"), conversation, "/v", reply=DEFAULT_REFUSAL)
    finally:
        gate.batcher.close()
    # The blocked request is estimated as the client sent it, without the instruction.
    client = len("Be brief.") + len(OFF_TOPIC[0])
    assert saved(registry, "similarity")[0] == pytest.approx(3 + 4 * 2 + client / 4, abs=1.5)
    assert saved(registry, "similarity")[1] == pytest.approx(50)


def test_the_record_says_what_was_saved(
    guard: Guard, metrics: Metrics, registry: CollectorRegistry, tmp_path: Path
) -> None:
    conversation = chat("Tell me a joke", system="Be brief.")
    with logging_gate(guard, metrics, tmp_path / "interactions.jsonl", prices=PRICES) as gate:
        gate.record(decision("blocked"), conversation, "/v1/chat/completions", reply=DEFAULT_REFUSAL)
        gate.record(decision("passed"), conversation, "/v1/chat/completions", 200, USAGE, "Sure.")
        gate.record(
            decision("passed", layer="classifier"),
            chat("Hi", model="x"),
            "/v",
            200,
            None,
            DEFAULT_REFUSAL,
            instructed=True,
        )
    blocked, passed, refused = read_interactions([tmp_path / "interactions.jsonl"])
    assert set(blocked) == RECORD_KEYS
    assert (blocked["prompt_chars"], blocked["prompt_messages"]) == (len("Be brief.Tell me a joke"), 2)
    prompt, completion, usd = saved(registry, "similarity")
    assert blocked["saved"] == {
        "layer": "similarity",
        "prompt_tokens": pytest.approx(prompt),
        "completion_tokens": completion,
        "usd": pytest.approx(usd),
        "shadow": False,
    }
    assert passed["saved"] is None
    assert refused["saved"]["layer"] == "instruction"
    assert refused["saved"]["prompt_tokens"] == 0
    assert refused["saved"]["usd"] is None  # model "x" has no price
    assert refused["prompt_messages"] == 1


def test_every_verdict_has_its_request_seconds(gate: Gate, registry: CollectorRegistry) -> None:
    for action in ("passed", "blocked", "would-block", "unjudged"):
        assert value(registry, "guardrail_request_seconds_count", verdict=action) == 0
    late = Decision("gr-1", "unjudged", None, 0.0, time.perf_counter() - 0.3)
    gate.record(late, Conversation(text=None), "/v1/chat/completions", 200)
    assert value(registry, "guardrail_request_seconds_count", verdict="unjudged") == 1
    assert 0.3 <= value(registry, "guardrail_request_seconds_sum", verdict="unjudged") < 5


def test_the_classifier_info_follows_reloads(
    model_cache: Path, real_estate_path: Path, tmp_path: Path, registry: CollectorRegistry
) -> None:
    guard = Guard.load(real_estate_path, cache_dir=model_cache)
    gate = Gate.from_settings(guard, Settings(), metrics=Metrics(registry))
    try:
        assert value(registry, "guardrail_classifier_info", classifier="none") == 1
        guard.reload(write_classifier(tmp_path / "estate-v1.onnx", guard))
        gate.record(decision("passed"), chat(ON_TOPIC[0]), "/v1/chat/completions")
        assert value(registry, "guardrail_classifier_info", classifier="estate-v1") == 1
        assert value(registry, "guardrail_classifier_info", classifier="none") == 0
        guard.reload(write_classifier(tmp_path / "estate-v2.onnx", guard))
        gate.record(decision("passed"), chat(ON_TOPIC[0]), "/v1/chat/completions")
        assert value(registry, "guardrail_classifier_info", classifier="estate-v2") == 1
        assert value(registry, "guardrail_classifier_info", classifier="estate-v1") == 0
        # The same file retrained and reloaded: a new model under the same name, still in force.
        guard.reload(write_classifier(tmp_path / "estate-v2.onnx", guard, inverted=True))
        gate.record(decision("passed"), chat(ON_TOPIC[0]), "/v1/chat/completions")
        assert value(registry, "guardrail_classifier_info", classifier="estate-v2") == 1
    finally:
        gate.batcher.close()


def test_from_settings_prices_the_gate(guard: Guard, registry: CollectorRegistry) -> None:
    gate = Gate.from_settings(guard, Settings(prices=PRICES), metrics=Metrics(registry))
    try:
        gate.record(decision("passed"), chat(ON_TOPIC[0]), "/v1/chat/completions", 200, USAGE, "Yes.")
    finally:
        gate.batcher.close()
    assert upstream(registry)[2] == pytest.approx((120 * 2.0 + 80 * 8.0) / 1e6)
