from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from guardrail import Guard, Verdict, parse_scenario
from guardrail.errors import ConfigError, ScenarioError

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
