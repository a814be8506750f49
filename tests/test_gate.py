from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from prometheus_client import CollectorRegistry

from guardrail.gate import Decision, Gate
from guardrail.guard import Guard, Verdict
from guardrail.interactions import InteractionLog, read_interactions
from guardrail.metrics import Metrics
from guardrail.protocols.base import Conversation

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
    log = InteractionLog(tmp_path / "interactions.jsonl")
    log.start()
    gate = make_gate(guard, metrics, log=log)
    conversation = Conversation(
        text="is it still available?", previous=ON_TOPIC[0], stream=True, model="gpt-x", include_usage=True
    )
    try:
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
    finally:
        gate.batcher.close()
        log.close()
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
    log = InteractionLog(tmp_path / "interactions.jsonl")
    log.start()
    gate = make_gate(guard, metrics, log=log, mode="shadow")
    conversation = Conversation(text=None)
    try:
        decision = decide(gate, conversation)
        gate.record(decision, conversation, "/chat/completions", status=502, error="unreachable")
    finally:
        gate.batcher.close()
        log.close()
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
