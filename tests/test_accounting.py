from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from guardrail import accounting
from guardrail.accounting import (
    DEFAULT_BASE_TOKENS,
    DEFAULT_CHARS_PER_TOKEN,
    DEFAULT_COMPLETION_TOKENS,
    DEFAULT_TOKENS_PER_MESSAGE,
    Accounting,
    PromptSize,
    TokenEstimator,
    prompt_size,
)
from guardrail.errors import ConfigError
from guardrail.metrics import Metrics
from guardrail.prices import Price, PriceTable
from guardrail.protocols.base import Conversation
from guardrail.protocols.openai import OpenAIChat


def parsed(payload: dict[str, Any]) -> Conversation:
    return OpenAIChat().parse(json.dumps(payload).encode())


def size(chars: int, messages: int, system: bool = False) -> PromptSize:
    return PromptSize(chars, messages, system, False)


def default_estimate(chars: int, messages: int) -> float:
    return DEFAULT_BASE_TOKENS + DEFAULT_TOKENS_PER_MESSAGE * messages + chars / DEFAULT_CHARS_PER_TOKEN


# --- the size of a request -----------------------------------------------------------------------


def test_prompt_size_counts_the_text_of_every_message() -> None:
    conversation = parsed(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": None},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "abc"}, {"type": "text", "text": "de"}],
                },
            ],
        }
    )
    assert prompt_size(conversation) == PromptSize(9 + 11 + 3 + 2, 4, True, False)


def test_prompt_size_counts_tools_and_tool_calls_as_json() -> None:
    tools = [{"type": "function", "function": {"name": "find_flat", "parameters": {"type": "object"}}}]
    calls = [{"id": "c1", "type": "function", "function": {"name": "find_flat", "arguments": "{}"}}]
    conversation = parsed(
        {
            "messages": [
                {"role": "user", "content": "flats?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "none"},
            ],
            "tools": tools,
        }
    )
    expected = len("flats?") + len("none") + len(json.dumps(calls, separators=(",", ":")))
    expected += len(json.dumps(tools, separators=(",", ":")))
    assert prompt_size(conversation) == PromptSize(expected, 3, False, False)


def test_images_are_noted_not_counted() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/flat.png"}}
    conversation = parsed(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]}
    )
    assert prompt_size(conversation) == PromptSize(2, 1, False, True)


def test_a_custom_json_api_is_measured_by_its_judged_text() -> None:
    assert prompt_size(Conversation(text="is it free?", previous="the flat")) == PromptSize(
        19, 2, False, False
    )
    assert prompt_size(Conversation(text=None)) == PromptSize(0, 0, False, False)


def test_the_instruction_is_appended_to_a_system_message_or_becomes_one() -> None:
    # As OpenAIChat.inject sends it: after the owner's text and a blank line, or as a new message.
    assert size(10, 2, system=True).with_instruction(100) == PromptSize(10, 2, True, False, added=102)
    assert size(10, 1).with_instruction(100) == PromptSize(10, 2, True, False, added=100)


# --- the prompt-token estimate -------------------------------------------------------------------


def test_before_any_data_the_estimate_is_the_default() -> None:
    estimator = TokenEstimator()
    assert estimator.prompt_tokens("gpt-x", size(400, 2)) == pytest.approx(default_estimate(400, 2))
    assert estimator.prompt_tokens(None, size(0, 1)) == pytest.approx(default_estimate(0, 1))
    assert estimator.fit("gpt-x") == pytest.approx(
        (DEFAULT_BASE_TOKENS, DEFAULT_TOKENS_PER_MESSAGE, DEFAULT_CHARS_PER_TOKEN, DEFAULT_CHARS_PER_TOKEN, 0)
    )


def feed(
    estimator: TokenEstimator, model: str | None, base: float, per_message: float, cpt: float, n: int
) -> None:
    """Observations from a known linear token model, with a token of rounding noise."""
    rng = random.Random(f"{model}{base}{cpt}")
    for _ in range(n):
        messages, chars = rng.randint(1, 6), rng.randint(20, 4000)
        tokens = round(base + per_message * messages + chars / cpt + rng.uniform(-1, 1))
        estimator.observe(model, size(chars, messages), tokens)


def test_the_estimate_calibrates_to_the_upstreams_counts() -> None:
    estimator = TokenEstimator()
    feed(estimator, "llama", base=12.0, per_message=6.0, cpt=3.0, n=1500)
    fit = estimator.fit("llama")
    assert fit.base == pytest.approx(12.0, abs=1.0)
    assert fit.per_message == pytest.approx(6.0, abs=0.3)
    assert fit.chars_per_token == pytest.approx(3.0, rel=0.01)
    assert fit.observations > 500
    for chars, messages in [(30, 1), (500, 2), (8000, 10)]:
        truth = 12.0 + 6.0 * messages + chars / 3.0
        assert estimator.prompt_tokens("llama", size(chars, messages)) == pytest.approx(
            truth, abs=1 + truth / 100
        )


def test_the_estimate_moves_to_the_data_smoothly() -> None:
    estimator = TokenEstimator()
    request = size(2000, 2)
    truth = 12.0 + 6.0 * 2 + 2000 / 3.0
    errors = []
    for n in (1, 10, 100):
        feed(estimator, "llama", base=12.0, per_message=6.0, cpt=3.0, n=n)
        errors.append(abs(estimator.prompt_tokens("llama", request) - truth))
    assert abs(default_estimate(2000, 2) - truth) > 150
    assert errors[0] < 50  # one observation already says most of what matters
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 5


def test_one_request_shape_keeps_the_prior_split_between_base_and_messages() -> None:
    # Every request with two messages: the data tells base + 2 * per_message, not each.
    estimator = TokenEstimator()
    rng = random.Random(0)
    for _ in range(300):
        chars = rng.randint(300, 500)
        estimator.observe("m", size(chars, 2, system=True), round(13 + chars / 4.8))
    fit = estimator.fit("m")
    assert fit.base + 2 * fit.per_message == pytest.approx(13, abs=2)
    assert fit.base > 0 and fit.per_message > 0
    # A one-message request (blocked before layer 2 added its system message) is near the truth.
    assert estimator.prompt_tokens("m", size(60, 1)) == pytest.approx(8 + 60 / 4.8, abs=3)


def test_the_instructions_tokens_are_learned_apart_from_the_clients_text() -> None:
    # Every passed request carries the same instruction, which tokenizes at its own rate (6 characters
    # a token here, the clients' text 3): a blocked request, sent without it, is estimated right.
    estimator = TokenEstimator()
    rng = random.Random(1)
    instruction = 600
    for _ in range(300):
        chars, messages = rng.randint(20, 600), rng.randint(1, 5)
        sent = size(chars, messages).with_instruction(instruction)
        estimator.observe("m", sent, round(3 + 5 * sent.messages + chars / 3 + instruction / 6))
    fit = estimator.fit("m")
    assert fit.chars_per_token == pytest.approx(3, rel=0.02)
    assert fit.instruction_chars_per_token == pytest.approx(6, rel=0.05)
    for chars, messages in [(40, 1), (300, 3)]:
        truth = 3 + 5 * messages + chars / 3
        assert estimator.prompt_tokens("m", size(chars, messages)) == pytest.approx(truth, abs=1.5)


def test_each_model_has_its_own_fit_and_others_share_them_all() -> None:
    estimator = TokenEstimator()
    feed(estimator, "dense", base=3.0, per_message=4.0, cpt=2.0, n=400)
    feed(estimator, "sparse", base=3.0, per_message=4.0, cpt=6.0, n=400)
    request = size(3000, 2)
    dense, sparse = estimator.prompt_tokens("dense", request), estimator.prompt_tokens("sparse", request)
    assert dense == pytest.approx(11 + 1500, rel=0.02)
    assert sparse == pytest.approx(11 + 500, rel=0.02)
    assert sparse < estimator.prompt_tokens("unseen", request) < dense
    assert estimator.prompt_tokens(None, request) == estimator.prompt_tokens("unseen", request)


def test_unknown_and_missing_models_share_one_fit() -> None:
    estimator = TokenEstimator()
    feed(estimator, None, base=3.0, per_message=4.0, cpt=2.0, n=300)
    assert estimator.fit(None).chars_per_token == pytest.approx(2.0, rel=0.02)
    assert estimator.fit(None).observations > 0


def test_models_past_the_limit_share_a_fit() -> None:
    estimator = TokenEstimator(max_models=2)
    for model in ("a", "b", "c", "d"):
        feed(estimator, model, base=3.0, per_message=4.0, cpt=2.0, n=5)
    assert set(estimator._models) == {"a", "b"}
    assert estimator.fit("c") == estimator.fit("d")


def test_the_fit_is_solved_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    solved = []
    solve = accounting._Model.solve

    def counting(self: Any, prior: tuple[float, float, float]) -> tuple[float, float, float]:
        solved.append(self)
        return solve(self, prior)

    monkeypatch.setattr(accounting._Model, "solve", counting)
    estimator = TokenEstimator()
    feed(estimator, "m", base=3.0, per_message=4.0, cpt=4.0, n=50)
    assert solved == []  # observing never solves
    first = estimator.prompt_tokens("m", size(100, 1))
    assert estimator.prompt_tokens("m", size(900, 3)) > first
    assert len(solved) == 1  # once for both estimates
    feed(estimator, "m", base=3.0, per_message=4.0, cpt=4.0, n=1)
    estimator.prompt_tokens("m", size(100, 1))
    assert len(solved) == 2  # new data: solved again when asked
    # With a large weight behind it, a fit is solved again only once enough new data came in.
    feed(estimator, "m", base=3.0, per_message=4.0, cpt=4.0, n=2000)
    estimator.prompt_tokens("m", size(100, 1))
    count = len(solved)
    feed(estimator, "m", base=3.0, per_message=4.0, cpt=4.0, n=1)
    estimator.prompt_tokens("m", size(100, 1))
    assert len(solved) == count
    feed(estimator, "m", base=3.0, per_message=4.0, cpt=4.0, n=20)
    estimator.prompt_tokens("m", size(100, 1))
    assert len(solved) == count + 1


def test_old_observations_fade() -> None:
    estimator = TokenEstimator()
    feed(estimator, "m", base=3.0, per_message=4.0, cpt=4.0, n=2000)
    feed(estimator, "m", base=3.0, per_message=4.0, cpt=2.0, n=5000)  # the model behind the name changed
    assert estimator.fit("m").chars_per_token == pytest.approx(2.0, rel=0.03)


def test_estimates_are_never_below_a_token_per_message() -> None:
    estimator = TokenEstimator(base_tokens=-50, tokens_per_message=0)
    assert estimator.prompt_tokens("m", size(0, 3)) == 3.0
    assert estimator.prompt_tokens("m", size(0, 0)) == 1.0
    estimator.observe("m", size(100, 1), 0)  # nonsense: ignored
    estimator.observe("m", size(100, 1), -5, -1)
    assert "m" not in estimator._models
    assert estimator.fit("m").observations == 0


def test_a_fitted_rate_stays_within_bounds() -> None:
    estimator = TokenEstimator()
    for chars in range(100, 10_000, 100):  # more characters, fewer tokens: nonsense data
        estimator.observe("m", size(chars, 1), max(1, 10_000 - chars))
    assert 0.5 <= estimator.fit("m").chars_per_token <= 20


def test_invalid_estimator_arguments() -> None:
    with pytest.raises(ValueError):
        TokenEstimator(chars_per_token=0)
    with pytest.raises(ValueError):
        TokenEstimator(decay=1.5)


# --- the completion estimate ---------------------------------------------------------------------


def test_completions_are_a_running_mean_per_model_with_a_global_fallback() -> None:
    estimator = TokenEstimator()
    assert estimator.completion_tokens("m") == DEFAULT_COMPLETION_TOKENS
    for tokens in (100, 200, 300):
        estimator.observe("m", None, None, tokens)
    assert estimator.completion_tokens("m") == pytest.approx(200, rel=0.01)
    estimator.observe("other", size(100, 1), 30, 1000)
    assert estimator.completion_tokens("other") == 1000
    assert estimator.completion_tokens("m") == pytest.approx(200, rel=0.01)
    # A model without answers of its own gets the mean of all of them.
    assert estimator.completion_tokens("new") == pytest.approx(400, rel=0.01)


def test_text_tokens_follow_the_fitted_rate() -> None:
    estimator = TokenEstimator()
    assert estimator.text_tokens("m", 400) == pytest.approx(400 / DEFAULT_CHARS_PER_TOKEN)
    feed(estimator, "m", base=3.0, per_message=4.0, cpt=2.0, n=500)
    assert estimator.text_tokens("m", 400) == pytest.approx(200, rel=0.02)


# --- prices --------------------------------------------------------------------------------------


def test_a_price_table_prices_its_models_and_the_default() -> None:
    table = PriceTable.of({"gpt-4o-mini": Price(0.15, 0.6)}, default=Price(1.0, 2.0))
    assert table.cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert table.cost("gpt-4o-mini", 1000, 0) == pytest.approx(0.00015)
    assert table.cost("other", 500_000, 250_000) == pytest.approx(1.0)
    assert table.cost(None, 1_000_000, 0) == pytest.approx(1.0)
    assert PriceTable.of({"gpt-4o-mini": Price(0.15, 0.6)}).cost("other", 1000, 1000) is None
    assert PriceTable().cost("gpt-4o-mini", 1000, 1000) is None
    assert table.price("gpt-4o-mini") == Price(0.15, 0.6)


def test_price_tables_compare_by_value() -> None:
    one = PriceTable.parse({"b": {"input": 1, "output": 2}, "a": {"input": 0, "output": 0}}, "x")
    two = PriceTable.of({"a": Price(0, 0), "b": Price(1, 2)})
    assert one == two
    assert hash(one) == hash(two)
    assert one != PriceTable()


def test_prices_parse_from_a_mapping_inline_json_and_files(tmp_path: Path) -> None:
    expected = PriceTable.of({"gpt-4o-mini": Price(0.15, 0.6)}, default=Price(1.0, 2.0))
    table = {"gpt-4o-mini": {"input": 0.15, "output": 0.6}, "default": {"input": 1, "output": 2}}
    assert PriceTable.parse(table, "flag") == expected
    assert PriceTable.parse(json.dumps(table), "flag") == expected
    (tmp_path / "prices.json").write_text(json.dumps(table))
    assert PriceTable.parse(str(tmp_path / "prices.json"), "flag") == expected
    (tmp_path / "prices.toml").write_text(
        '["gpt-4o-mini"]\ninput = 0.15\noutput = 0.6\n[default]\ninput = 1\noutput = 2\n'
    )
    assert PriceTable.parse("prices.toml", "flag", base=tmp_path) == expected
    assert PriceTable.parse("  ", "flag") == PriceTable()
    assert PriceTable.parse(expected, "flag") is expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"m": {"input": -1, "output": 1}}, "prices.m.input must be 0 or more, got -1"),
        (
            {"m": {"input": 1, "output": "2"}},
            "prices.m.output must be USD per million tokens (a number), got '2'",
        ),
        ({"m": {"input": True, "output": 1}}, "prices.m.input must be USD per million tokens"),
        ({"m": {"input": 1}}, "prices.m.output must be USD per million tokens (a number), got None"),
        (
            {"m": {"input": 1, "output": 1, "cached": 0.5}},
            "prices.m: unknown key(s) cached; use input and output",
        ),
        ({"m": 0.15}, "prices.m must be a table with input and output, got 0.15"),
        ({"": {"input": 1, "output": 1}}, "a model name must be a non-empty string"),
        ({"m": {"input": float("nan"), "output": 1}}, "prices.m.input must be USD per million tokens"),
        (3, "prices must be a table of models, a .json or .toml file, or inline JSON; got 3"),
        ("{not json", "prices is not valid JSON"),
        ("prices.yaml", "prices file prices.yaml must end in .json or .toml"),
    ],
)
def test_bad_prices_are_config_errors(value: object, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        PriceTable.parse(value, "GUARDRAIL_PRICES")
    assert str(info.value).startswith("GUARDRAIL_PRICES: ")
    assert words in str(info.value)


def test_bad_price_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read prices file"):
        PriceTable.parse(str(tmp_path / "missing.json"), "--prices")
    (tmp_path / "bad.toml").write_text("[m\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        PriceTable.parse(str(tmp_path / "bad.toml"), "--prices")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="prices must be a table of models"):
        PriceTable.parse(str(tmp_path / "bad.json"), "--prices")


# --- accounting ----------------------------------------------------------------------------------


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_every_savings_series_exists_from_the_start() -> None:
    registry = CollectorRegistry()
    Accounting(Metrics(registry))
    for layer in ("similarity", "classifier", "instruction"):
        for kind in ("prompt", "completion"):
            assert sample(registry, "guardrail_tokens_saved_total", layer=layer, kind=kind) == 0
            assert sample(registry, "guardrail_tokens_would_save_total", layer=layer, kind=kind) == 0
        assert sample(registry, "guardrail_cost_saved_usd_total", layer=layer) == 0
    assert sample(registry, "guardrail_upstream_tokens_total", kind="prompt") == 0


def test_nonsense_usage_is_neither_counted_nor_learned() -> None:
    registry = CollectorRegistry()
    books = Accounting(Metrics(registry), PriceTable.of({}, default=Price(1, 1)))
    nonsense = [{"prompt_tokens": -3, "completion_tokens": "many"}, {"prompt_tokens": True}, {}]
    nonsense += [{"prompt_tokens": 10**400, "completion_tokens": 2.5}]
    for usage in nonsense:
        assert books.account("passed", "similarity", "m", size(100, 1), usage) is None
    assert sample(registry, "guardrail_upstream_tokens_total", kind="prompt") == 0
    assert sample(registry, "guardrail_upstream_cost_usd_total") == 0
    assert books.estimator.fit("m").observations == 0


def test_requests_with_images_count_but_do_not_calibrate() -> None:
    registry = CollectorRegistry()
    books = Accounting(Metrics(registry))
    books.account("passed", "similarity", "m", PromptSize(10, 1, False, True), {"prompt_tokens": 900})
    assert sample(registry, "guardrail_upstream_tokens_total", kind="prompt") == 900
    assert books.estimator.fit("m").observations == 0


def test_broken_off_replies_and_refusals_do_not_shorten_the_mean_answer() -> None:
    books = Accounting(Metrics(CollectorRegistry()), instruction="Stay on topic.")
    usage = {"prompt_tokens": 50, "completion_tokens": 3}
    books.account("passed", "similarity", "m", size(100, 1), usage, complete=False)
    books.account("passed", "similarity", "m", size(100, 1), usage, "Sorry.", refused=True, instructed=True)
    assert books.estimator.completion_tokens("m") == DEFAULT_COMPLETION_TOKENS
    assert books.estimator.fit("m").observations > 1.9  # both prompts still calibrate
