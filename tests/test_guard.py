from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from guardrail import Guard, Verdict, parse_scenario
from guardrail.encoder import Encoder
from guardrail.errors import ConfigError, ModelError, ScenarioError
from guardrail.guard import Query
from guardrail.settings import Settings

from classifiers import write_classifier
from samples import OFF_TOPIC, ON_TOPIC, VIEWING


def small_guard(guard: Guard, cache_size: int) -> Guard:
    """A guard with its own cache, sharing the session guard's encoder and calibrated layer."""
    return Guard(guard.encoder, guard.similarity, cache_size=cache_size)


def test_verdict_is_a_frozen_dataclass(guard: Guard) -> None:
    verdict = guard.check("can I book a viewing this Saturday?")
    assert isinstance(verdict, Verdict)
    assert verdict.layer == "similarity"
    assert verdict.threshold == guard.threshold
    assert verdict.allowed is (verdict.score >= verdict.threshold)
    assert isinstance(verdict.score, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.allowed = False  # type: ignore[misc]


def test_guard_knows_its_document(guard: Guard, real_estate_path: Path) -> None:
    assert guard.document.title == "Real Estate Agency Assistant"
    assert guard.document.path == str(real_estate_path)
    assert guard.threshold == guard.similarity.calibration.threshold


@pytest.mark.parametrize("text", ON_TOPIC)
def test_on_topic_messages_are_allowed(guard: Guard, text: str) -> None:
    verdict = guard.check(text)
    assert verdict.allowed, verdict


@pytest.mark.parametrize("text", OFF_TOPIC)
def test_off_topic_messages_are_blocked(guard: Guard, text: str) -> None:
    verdict = guard.check(text)
    assert not verdict.allowed, verdict


def test_on_topic_mean_score_is_higher(guard: Guard) -> None:
    on = [v.score for v in guard.check_many(ON_TOPIC)]
    off = [v.score for v in guard.check_many(OFF_TOPIC)]
    assert sum(on) / len(on) > sum(off) / len(off) + 0.2


def test_nearest_scenario_for_a_viewing_request(guard: Guard) -> None:
    assert guard.check("can I book a viewing this Saturday?").scenario == VIEWING


def test_every_verdict_names_a_scenario_of_the_document(guard: Guard) -> None:
    for verdict in guard.check_many(ON_TOPIC + OFF_TOPIC):
        assert verdict.scenario in guard.document.scenarios


def test_threshold_setting_overrides_calibration(
    guard: Guard, model_cache: Path, real_estate_path: Path
) -> None:
    strict = Guard.load(real_estate_path, cache_dir=model_cache, threshold=0.9)
    assert strict.threshold == 0.9
    assert strict.similarity.calibration.source == "setting"
    verdict = strict.check("I'd like a free valuation of my house before I sell it")
    assert verdict.threshold == 0.9
    assert not verdict.allowed
    assert verdict.score == pytest.approx(
        guard.check("I'd like a free valuation of my house before I sell it").score
    )


def test_default_calibration_source(guard: Guard) -> None:
    assert guard.similarity.calibration.source in {"document", "background"}


def test_load_from_a_parsed_document(guard: Guard, model_cache: Path) -> None:
    document = parse_scenario(
        "# Viewings\nBooks house viewings.\n## Scenarios\n- Booking a property viewing\n"
        "- Rescheduling or cancelling a viewing\n"
    )
    small = Guard.load(document, cache_dir=model_cache)
    assert small.document is document
    assert small.check("can I move my viewing to Friday?").score > small.check("tell me a joke").score


@pytest.mark.parametrize("target_pass", [0.2, 1.0])
def test_target_pass_out_of_range_is_a_config_error(
    model_cache: Path, real_estate_path: Path, target_pass: float
) -> None:
    with pytest.raises(ConfigError, match="target_pass"):
        Guard.load(real_estate_path, cache_dir=model_cache, target_pass=target_pass)


def test_missing_scenario_file_is_a_scenario_error(model_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"nope\.md"):
        Guard.load(tmp_path / "nope.md", cache_dir=model_cache)


def test_repeated_text_returns_the_cached_verdict(guard: Guard) -> None:
    first = guard.check("Do you have any flats to rent in Camden?")
    assert guard.check("Do you have any flats to rent in Camden?") is first


def test_whitespace_variants_hit_the_cache(guard: Guard) -> None:
    fresh = small_guard(guard, cache_size=16)
    first = fresh.check("what are   your agency fees?")
    assert fresh.check("  what are your agency fees?\n") is first
    assert fresh.check("what\tare your\nagency fees?") is first
    assert len(fresh._cache) == 1
    # Case is kept: a cased model could embed it differently.
    assert fresh.check("WHAT ARE YOUR AGENCY FEES?") is not first
    assert len(fresh._cache) == 2


def test_cache_size_bounds_the_cache_and_evicts_least_recently_used(guard: Guard) -> None:
    small = small_guard(guard, cache_size=2)
    a = small.check("rent a flat")
    small.check("sell a house")
    assert small.check("rent a flat") is a  # now the most recently used
    small.check("book a viewing")  # evicts "sell a house"
    assert len(small._cache) == 2
    assert list(small._cache) == ["rent a flat", "book a viewing"]
    assert small.check("rent a flat") is a


def test_cache_never_grows_past_its_size(guard: Guard) -> None:
    small = small_guard(guard, cache_size=3)
    verdicts = small.check_many([f"is flat {i} still available?" for i in range(10)])
    assert len(verdicts) == 10
    assert len(small._cache) == 3


def test_cache_size_zero_still_works(guard: Guard) -> None:
    uncached = small_guard(guard, cache_size=0)
    first = uncached.check("can I book a viewing this Saturday?")
    second = uncached.check("can I book a viewing this Saturday?")
    assert first == second
    assert first is not second
    assert first.allowed
    assert len(uncached._cache) == 0
    assert [v.allowed for v in uncached.check_many(["rent", "tell me a joke", "rent"])] == [
        v.allowed for v in guard.check_many(["rent", "tell me a joke", "rent"])
    ]


def test_check_many_keeps_order_and_shares_duplicates(guard: Guard) -> None:
    fresh = small_guard(guard, cache_size=16)
    texts = ["tell me a joke", "book a viewing on Saturday", "tell me a joke", " tell me  a joke ", "rent"]
    verdicts = fresh.check_many(texts)
    assert len(verdicts) == len(texts)
    assert verdicts[0] is verdicts[2] is verdicts[3]
    assert verdicts[0] is not verdicts[1]
    assert [v.allowed for v in verdicts[:2]] == [False, True]
    assert len(fresh._cache) == 3
    for text, verdict in zip(texts, verdicts, strict=True):
        alone = small_guard(guard, cache_size=0).check(text)
        assert (alone.allowed, alone.scenario) == (verdict.allowed, verdict.scenario)
        assert alone.score == pytest.approx(verdict.score, abs=1e-5)


def test_check_many_empty(guard: Guard) -> None:
    assert guard.check_many([]) == []


def test_check_and_check_many_agree(guard: Guard) -> None:
    fresh = small_guard(guard, cache_size=0)
    together = fresh.check_many(ON_TOPIC + OFF_TOPIC)
    one_by_one = [fresh.check(t) for t in ON_TOPIC + OFF_TOPIC]
    for a, b in zip(together, one_by_one, strict=True):
        assert a.allowed == b.allowed
        assert a.scenario == b.scenario
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_concurrent_checks_agree_with_serial_ones_and_keep_the_cache_bounded(guard: Guard) -> None:
    # The proxy will call the guard from a thread pool: the shared cache must stay consistent.
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"{t} (variant {i})" for i in range(12) for t in ON_TOPIC + OFF_TOPIC]
    serial = {t: small_guard(guard, cache_size=0).check(t) for t in texts}
    shared = small_guard(guard, cache_size=50)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(shared.check, texts * 3))
    for text, verdict in zip(texts * 3, results, strict=True):
        assert verdict.allowed == serial[text].allowed
        assert abs(verdict.score - serial[text].score) < 1e-5
    assert len(shared._cache) <= 50


# --- follow-ups ----------------------------------------------------------------------------------

OPENER = ON_TOPIC[0]  # "Is the two-bedroom flat on Station Road still available to rent?"
FOLLOW_UPS = ["and what about the second one?", "is it still available?", "how much is it?"]
TOPICAL = ["who won the football match?", "tell me a joke", "what about a cookie recipe?"]


class CountingEncoder:
    """The session encoder, counting how often the guard calls it."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.calls: list[int] = []

    def encode(self, texts: Sequence[str]) -> Any:
        self.calls.append(len(texts))
        return self.encoder.encode(texts)


def counting_guard(guard: Guard) -> tuple[Guard, CountingEncoder]:
    counter = CountingEncoder(guard.encoder)
    return Guard(counter, guard.similarity, cache_size=0), counter  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [*ON_TOPIC[:3], *OFF_TOPIC[:3], *FOLLOW_UPS])
def test_judge_without_previous_is_check(guard: Guard, text: str) -> None:
    assert guard.judge(text) == guard.check(text)
    assert guard.judge(text, None) == guard.check(text)
    assert guard.judge(text, "  \n") == guard.check(text)


@pytest.mark.parametrize("text", FOLLOW_UPS)
def test_a_follow_up_alone_is_blocked_and_flagged(guard: Guard, text: str) -> None:
    verdict = guard.judge(text)
    assert not verdict.allowed
    assert verdict.followup
    assert not verdict.context


@pytest.mark.parametrize("opener", ON_TOPIC[:3])
@pytest.mark.parametrize("text", FOLLOW_UPS)
def test_a_follow_up_after_an_on_topic_question_passes(guard: Guard, text: str, opener: str) -> None:
    verdict = guard.judge(text, previous=opener)
    assert verdict.allowed, verdict
    assert verdict.followup
    assert verdict.context


def test_the_joint_verdict_is_the_check_of_both_turns(guard: Guard) -> None:
    joint = guard.judge("is it still available?", previous=OPENER)
    both = guard.check(f"{OPENER}\nis it still available?")
    assert (joint.allowed, joint.scenario, joint.threshold) == (both.allowed, both.scenario, both.threshold)
    assert joint.score == pytest.approx(both.score, abs=1e-6)


@pytest.mark.parametrize("opener", OFF_TOPIC[:3])
@pytest.mark.parametrize("text", FOLLOW_UPS)
def test_a_follow_up_after_an_off_topic_question_stays_blocked(guard: Guard, text: str, opener: str) -> None:
    verdict = guard.judge(text, previous=opener)
    assert not verdict.allowed, verdict
    assert verdict.context


@pytest.mark.parametrize("opener", ON_TOPIC[:3])
@pytest.mark.parametrize("text", TOPICAL)
def test_an_off_topic_question_cannot_ride_on_an_on_topic_opener(
    guard: Guard, text: str, opener: str
) -> None:
    verdict = guard.judge(text, previous=opener)
    assert not verdict.allowed, verdict
    assert not verdict.followup
    assert not verdict.context
    assert verdict == guard.check(text)


def test_a_short_elliptical_off_topic_question_stays_blocked(guard: Guard) -> None:
    verdict = guard.judge("and the weather tomorrow?", previous=OPENER)
    assert not verdict.allowed, verdict


def test_an_on_topic_message_is_never_judged_with_context(guard: Guard) -> None:
    verdict = guard.judge(ON_TOPIC[1], previous=OFF_TOPIC[0])
    assert verdict.allowed
    assert not verdict.context
    assert verdict == guard.check(ON_TOPIC[1])


def test_judge_many_matches_judge_one_by_one(guard: Guard) -> None:
    queries = [
        Query(ON_TOPIC[1]),
        Query(OFF_TOPIC[1]),
        Query("is it still available?", OPENER),
        Query("and what about the second one?", OFF_TOPIC[2]),
        Query("how much is it?"),
        Query("who won the football match?", OPENER),
        Query("is it still available?", OPENER),  # a duplicate in the same batch
        Query(ON_TOPIC[2], OFF_TOPIC[0]),
    ]
    batched, counter = counting_guard(guard)
    verdicts = batched.judge_many(queries)
    # One encoder call for the messages, one for the follow-ups with their context.
    assert counter.calls == [len({q.text for q in queries}), 2]
    assert [(v.allowed, v.followup, v.context) for v in verdicts] == [
        (True, False, False),
        (False, False, False),
        (True, True, True),
        (False, True, True),
        (False, True, False),
        (False, False, False),
        (True, True, True),
        (True, False, False),
    ]
    alone, _ = counting_guard(guard)
    for query, verdict in zip(queries, verdicts, strict=True):
        single = alone.judge(query.text, query.previous)
        assert (single.allowed, single.followup, single.context, single.scenario) == (
            verdict.allowed,
            verdict.followup,
            verdict.context,
            verdict.scenario,
        )
        assert single.score == pytest.approx(verdict.score, abs=1e-5)


def test_judge_many_without_follow_ups_calls_the_encoder_once(guard: Guard) -> None:
    batched, counter = counting_guard(guard)
    verdicts = batched.judge_many([Query(t, OPENER) for t in OFF_TOPIC[:4]])
    assert counter.calls == [4]
    assert not any(v.context for v in verdicts)


def test_judge_many_empty(guard: Guard) -> None:
    assert guard.judge_many([]) == []


# Layer 3 ------------------------------------------------------------------------------------------


def test_a_configured_classifier_that_does_not_exist_yet_leaves_layer_1_deciding(
    model_cache: Path, real_estate_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(cache_dir=model_cache, classifier=tmp_path / "later.onnx")
    with caplog.at_level("WARNING", logger="guardrail"):
        guard = Guard.from_settings(settings, real_estate_path)
    assert guard.classifier is None
    assert guard.check(ON_TOPIC[0]).layer == "similarity"
    assert "does not exist yet" in caplog.text


def test_a_broken_classifier_file_stops_the_start(
    model_cache: Path, real_estate_path: Path, tmp_path: Path
) -> None:
    guard = Guard.load(real_estate_path, cache_dir=model_cache)
    broken = tmp_path / "broken.onnx"
    write_classifier(broken, guard)
    broken.write_bytes(b"not a model")  # the card beside it is fine
    with pytest.raises(ModelError, match="onnxruntime cannot load it"):
        Guard.from_settings(Settings(cache_dir=model_cache, classifier=broken), real_estate_path)


def test_with_a_classifier_it_decides_and_layer_1_keeps_its_blocks(
    model_cache: Path, real_estate_path: Path, tmp_path: Path
) -> None:
    guard = Guard.load(real_estate_path, cache_dir=model_cache)
    write_classifier(tmp_path / "m.onnx", guard)
    guard.reload(tmp_path / "m.onnx")
    on, off = guard.check(ON_TOPIC[0]), guard.check(OFF_TOPIC[0])
    assert on.allowed and on.layer == "classifier" and on.classifier == "m"
    assert on.score == on.classifier_score and on.threshold == 0.5
    assert on.similarity_score is not None and on.similarity_score >= guard.threshold
    # Layer 1 blocks it too, so the block is layer 1's.
    assert not off.allowed and off.layer == "similarity"
    assert off.similarity_score is not None and off.similarity_score < guard.threshold


def test_a_reload_drops_the_cached_decisions_of_the_old_model(
    model_cache: Path, real_estate_path: Path, tmp_path: Path
) -> None:
    guard = Guard.load(real_estate_path, cache_dir=model_cache)
    write_classifier(tmp_path / "m.onnx", guard)
    guard.reload(tmp_path / "m.onnx")
    assert guard.check(ON_TOPIC[0]).allowed
    write_classifier(tmp_path / "m.onnx", guard, inverted=True)
    guard.reload()  # the same path again
    assert not guard.check(ON_TOPIC[0]).allowed


def test_a_card_for_another_model_file_is_refused_and_the_current_model_stays(
    model_cache: Path, real_estate_path: Path, tmp_path: Path
) -> None:
    guard = Guard.load(real_estate_path, cache_dir=model_cache)
    write_classifier(tmp_path / "m.onnx", guard)
    first = guard.reload(tmp_path / "m.onnx")
    card = json.loads((tmp_path / "m.json").read_text())
    card["model_sha256"] = "0" * 64  # as if the card were renamed in before its model
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="another model file"):
        guard.reload()
    assert guard.classifier is first


def test_a_classifier_for_another_version_of_the_document_loads_with_a_warning(
    model_cache: Path, real_estate_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guard = Guard.load(real_estate_path, cache_dir=model_cache)
    write_classifier(tmp_path / "m.onnx", guard)
    card = json.loads((tmp_path / "m.json").read_text())
    card["scenario"] = {"name": "real_estate", "digest": "0" * 16}  # trained before an edit
    (tmp_path / "m.json").write_text(json.dumps(card))
    with caplog.at_level("WARNING", logger="guardrail"):
        assert guard.reload(tmp_path / "m.onnx").name == "m"
    assert "another version of the scenario document" in caplog.text
    caplog.clear()
    card["scenario"]["digest"] = guard.document.digest
    (tmp_path / "m.json").write_text(json.dumps(card))
    with caplog.at_level("WARNING", logger="guardrail"):
        guard.reload()
    assert "another version" not in caplog.text
