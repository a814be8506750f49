from __future__ import annotations

import hashlib
import math
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from guardrail.encoder import Encoder
from guardrail.errors import ConfigError
from guardrail.layers.similarity import (
    FEATURE_NAMES,
    Calibration,
    SimilarityLayer,
    load_background,
    load_followups,
    softmax_pool,
)
from guardrail.scenario import ScenarioDocument, load_scenario, parse_scenario

from samples import OFF_TOPIC, ON_TOPIC, VIEWING

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def document() -> ScenarioDocument:
    return load_scenario(ROOT / "scenarios" / "real_estate.md")


@pytest.fixture(scope="module")
def layer(document: ScenarioDocument, encoder: Encoder) -> SimilarityLayer:
    return SimilarityLayer.build(document, encoder)


def scores_of(layer: SimilarityLayer, encoder: Encoder, texts: list[str]) -> np.ndarray:
    scores, _ = layer.score(encoder.encode(texts))
    return scores


def test_softmax_pool_by_hand() -> None:
    similarities = np.array([[0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    pooled = softmax_pool(similarities, tau=10.0)
    assert pooled[0] == pytest.approx(math.log((1 + math.exp(10)) / 2) / 10, abs=1e-6)
    assert pooled[1] == pytest.approx(0.5, abs=1e-6)


def test_softmax_pool_lies_between_mean_and_max() -> None:
    rng = np.random.default_rng(0)
    similarities = rng.uniform(-1, 1, size=(20, 30)).astype(np.float32)
    pooled = softmax_pool(similarities)
    assert np.all(pooled >= similarities.mean(axis=1) - 1e-6)
    assert np.all(pooled <= similarities.max(axis=1) + 1e-6)
    np.testing.assert_allclose(softmax_pool(similarities, tau=1e4), similarities.max(axis=1), atol=1e-3)
    np.testing.assert_allclose(softmax_pool(similarities, tau=0.01), similarities.mean(axis=1), atol=5e-3)


def test_background_is_clean() -> None:
    background = load_background()
    assert len(background) > 1000
    assert all(line == line.strip() and line for line in background)
    assert len({line.casefold() for line in background}) == len(background)


def test_default_calibration_comes_from_the_document_or_the_background(layer: SimilarityLayer) -> None:
    calibration = layer.calibration
    assert calibration.source in {"document", "background"}
    assert calibration.threshold == min(calibration.document_quantile, calibration.background_quantile)
    expected = (
        "document" if calibration.document_quantile <= calibration.background_quantile else "background"
    )
    assert calibration.source == expected
    assert layer.threshold == calibration.threshold


def test_threshold_setting_overrides_calibration(
    layer: SimilarityLayer, document: ScenarioDocument, encoder: Encoder
) -> None:
    fixed = SimilarityLayer.build(document, encoder, threshold=0.5)
    assert fixed.threshold == 0.5
    assert fixed.calibration == Calibration(
        0.5,
        "setting",
        layer.calibration.document_quantile,
        layer.calibration.background_quantile,
        layer.calibration.background_median,
    )


def test_higher_target_pass_never_raises_the_threshold(document: ScenarioDocument, encoder: Encoder) -> None:
    lenient = SimilarityLayer.build(document, encoder, target_pass=0.99)
    strict = SimilarityLayer.build(document, encoder, target_pass=0.6)
    assert lenient.calibration.document_quantile <= strict.calibration.document_quantile


@pytest.mark.parametrize("target_pass", [0.0, 0.3, 0.49, 1.0, 1.5, -0.95])
def test_target_pass_out_of_range_is_a_config_error(
    target_pass: float, document: ScenarioDocument, encoder: Encoder
) -> None:
    with pytest.raises(ConfigError, match="target_pass"):
        SimilarityLayer.build(document, encoder, target_pass=target_pass)


@pytest.mark.parametrize("background_pass", [0.0, 0.5, 1.0])
def test_background_pass_out_of_range_is_a_config_error(
    background_pass: float, document: ScenarioDocument, encoder: Encoder
) -> None:
    with pytest.raises(ConfigError, match="background_pass"):
        SimilarityLayer.build(document, encoder, background_pass=background_pass)


def test_on_topic_messages_score_above_the_threshold(layer: SimilarityLayer, encoder: Encoder) -> None:
    scores = scores_of(layer, encoder, ON_TOPIC)
    low = [(t, float(s)) for t, s in zip(ON_TOPIC, scores, strict=True) if s < layer.threshold]
    assert not low, f"on-topic messages below {layer.threshold:.3f}: {low}"


def test_off_topic_messages_score_below_the_threshold(layer: SimilarityLayer, encoder: Encoder) -> None:
    scores = scores_of(layer, encoder, OFF_TOPIC)
    high = [(t, float(s)) for t, s in zip(OFF_TOPIC, scores, strict=True) if s >= layer.threshold]
    assert not high, f"off-topic messages above {layer.threshold:.3f}: {high}"


def test_on_topic_outscores_off_topic_on_average(layer: SimilarityLayer, encoder: Encoder) -> None:
    on = scores_of(layer, encoder, ON_TOPIC)
    off = scores_of(layer, encoder, OFF_TOPIC)
    assert on.mean() > off.mean() + 0.2
    assert on.min() > off.max()


def test_score_shapes_and_nearest_scenario(
    layer: SimilarityLayer, encoder: Encoder, document: ScenarioDocument
) -> None:
    scores, nearest = layer.score(encoder.encode(["can I book a viewing this Saturday?", "hello", "rent"]))
    assert scores.shape == nearest.shape == (3,)
    assert scores.dtype == np.float32
    assert all(0 <= i < len(document.scenarios) for i in nearest)
    assert document.scenarios[nearest[0]] == VIEWING


def test_examples_point_to_a_scenario(layer: SimilarityLayer, document: ScenarioDocument) -> None:
    n = len(document.scenarios)
    assert len(layer.nearest_scenario) == n + len(document.examples)
    assert list(layer.nearest_scenario[:n]) == list(range(n))
    assert all(0 <= i < n for i in layer.nearest_scenario[n:])
    # "I'd like to book a viewing for 14 Maple Street this Saturday morning"
    assert document.scenarios[layer.nearest_scenario[n + 1]] == VIEWING


def test_the_documents_own_items_score_high(layer: SimilarityLayer, document: ScenarioDocument) -> None:
    scores, nearest = layer.score(layer.item_vectors)
    assert np.all(scores > layer.threshold)
    n = len(document.scenarios)
    assert list(nearest[:n]) == list(range(n))


def cache_file(encoder: Encoder, texts: tuple[str, ...]) -> Path:
    """Where ``_cached_encode`` keeps the vectors of a fixed text set."""
    assert encoder.path is not None
    return encoder.path / f"texts-{hashlib.sha256(chr(10).join(texts).encode()).hexdigest()[:16]}.npy"


def test_background_and_followup_embeddings_are_cached_beside_the_export(
    layer: SimilarityLayer, document: ScenarioDocument, encoder: Encoder
) -> None:
    for texts in (load_background(), load_followups()):
        vectors = np.load(cache_file(encoder, texts))
        assert vectors.shape == (len(texts), 384)
    assert layer.followup_vectors is not None
    np.testing.assert_array_equal(layer.followup_vectors, np.load(cache_file(encoder, load_followups())))
    again = SimilarityLayer.build(document, encoder)
    np.testing.assert_array_equal(again.background_vectors, layer.background_vectors)
    assert again.calibration == layer.calibration


def test_background_the_document_covers_is_dropped(encoder: Encoder) -> None:
    # A weather bot's background still has weather questions; they must not argue against it.
    weather = SimilarityLayer.build(
        load_scenario(ROOT / "benchmarks" / "hwu64" / "bots" / "weather.md"), encoder
    )
    assert len(weather.background_vectors) < len(load_background())
    scores = scores_of(
        weather, encoder, ["what's the weather like today", "will it rain tomorrow afternoon?"]
    )
    assert np.all(scores > weather.threshold)
    assert np.all(scores_of(weather, encoder, ["book a table for two", "play some jazz"]) < weather.threshold)


def test_custom_background(document: ScenarioDocument, encoder: Encoder) -> None:
    background = ("tell me a joke", "what's the capital of France", "how do I bake bread", "who won the game")
    layer = SimilarityLayer.build(document, encoder, background=background)
    assert len(layer.background_vectors) <= len(background)
    assert (
        scores_of(layer, encoder, ["can I book a viewing?"])[0]
        > scores_of(layer, encoder, ["tell me a joke"])[0]
    )


def test_one_scenario_document_builds_without_nan(encoder: Encoder) -> None:
    # One item leaves nothing to leave out: the whole background stays and the background calibrates.
    document = parse_scenario(
        "# W\n## Scenarios\n- Weather forecasts, rain, temperature and current conditions\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        layer = SimilarityLayer.build(document, encoder)
        scores = scores_of(layer, encoder, ["will it rain in paris tomorrow", "book me a table for two"])
    assert len(layer.background_vectors) == len(load_background())
    assert layer.calibration.source == "background"
    assert layer.calibration.document_quantile is None
    assert math.isfinite(layer.threshold)
    assert scores[0] >= layer.threshold > scores[1]


def test_one_scenario_document_still_scores(encoder: Encoder) -> None:
    document = parse_scenario("# V\n## Scenarios\n- Booking a property viewing\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        layer = SimilarityLayer.build(document, encoder)
    assert math.isfinite(layer.threshold)
    scores = scores_of(layer, encoder, ["can I see the house on saturday", "what's the weather"])
    assert scores[0] > scores[1]


# --- follow-ups ----------------------------------------------------------------------------------

GENERIC_FOLLOW_UPS = [
    "and what about the second one?",
    "is it still available?",
    "how much is it?",
    "can you tell me more?",
    "why?",
    "and the one after that?",
]


def test_shipped_followups_load_clean() -> None:
    followups = load_followups()
    assert len(followups) > 50
    assert all(line == line.strip() and line for line in followups)
    assert len({line.casefold() for line in followups}) == len(followups)
    raw = resources.files("guardrail.data").joinpath("followups.txt").read_text(encoding="utf-8")
    assert all(line.strip() for line in raw.splitlines()), "blank line in followups.txt"
    assert raw.endswith("\n")


def test_followups_do_not_overlap_the_background() -> None:
    background = {line.casefold() for line in load_background()}
    assert not [line for line in load_followups() if line.casefold() in background]


def test_generic_follow_ups_are_flagged(layer: SimilarityLayer, encoder: Encoder) -> None:
    flags = layer.followup(encoder.encode(GENERIC_FOLLOW_UPS))
    assert flags.dtype == np.bool_
    assert flags.shape == (len(GENERIC_FOLLOW_UPS),)
    assert flags.all(), dict(zip(GENERIC_FOLLOW_UPS, flags, strict=True))


def test_questions_with_a_topic_are_not_follow_ups(layer: SimilarityLayer, encoder: Encoder) -> None:
    texts = [*OFF_TOPIC, *ON_TOPIC[:5], "who won the football match?", "what about a cookie recipe?"]
    flags = layer.followup(encoder.encode(texts))
    assert not flags.any(), [t for t, f in zip(texts, flags, strict=True) if f]


def test_shipped_followups_flag_themselves(layer: SimilarityLayer) -> None:
    assert layer.followup_vectors is not None
    assert layer.followup(layer.followup_vectors).all()


def test_no_followups_flags_nothing(document: ScenarioDocument, encoder: Encoder) -> None:
    bare = SimilarityLayer.build(document, encoder, followups=())
    assert bare.followup_vectors is None
    flags = bare.followup(encoder.encode(GENERIC_FOLLOW_UPS))
    assert flags.shape == (len(GENERIC_FOLLOW_UPS),)
    assert not flags.any()


def test_custom_followups(document: ScenarioDocument, encoder: Encoder) -> None:
    custom = SimilarityLayer.build(document, encoder, followups=("and the second one?",))
    assert custom.followup_vectors is not None
    assert custom.followup_vectors.shape == (1, 384)
    flags = custom.followup(encoder.encode(["and what about the second one?", "tell me a joke"]))
    assert list(flags) == [True, False]


@pytest.mark.parametrize("with_followups", [True, False])
def test_the_scoring_graph_matches_numpy(
    document: ScenarioDocument, encoder: Encoder, with_followups: bool
) -> None:
    layer = SimilarityLayer.build(document, encoder, followups=None if with_followups else ())
    rng = np.random.default_rng(1)
    vectors = np.vstack([encoder.encode(ON_TOPIC + OFF_TOPIC), rng.normal(size=(20, encoder.dim))])
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    scores, nearest, followups, features = layer.evaluate(vectors)

    items, background = layer.item_vectors, layer.background_vectors
    expected = softmax_pool(vectors @ items.T, layer.tau) - softmax_pool(vectors @ background.T, layer.tau)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    np.testing.assert_array_equal(nearest, layer.nearest_scenario[(vectors @ items.T).argmax(axis=1)])
    # Layer 3's input: the embedding, then FEATURE_NAMES.
    assert features.shape == (len(vectors), encoder.dim + len(FEATURE_NAMES))
    np.testing.assert_allclose(features[:, : encoder.dim], vectors, atol=1e-7)
    columns = dict(zip(FEATURE_NAMES, features[:, encoder.dim :].T, strict=True))
    np.testing.assert_allclose(columns["similarity_score"], expected, atol=1e-5)
    np.testing.assert_allclose(columns["items_pool"], softmax_pool(vectors @ items.T, layer.tau), atol=1e-5)
    np.testing.assert_allclose(
        columns["background_pool"], softmax_pool(vectors @ background.T, layer.tau), atol=1e-5
    )
    np.testing.assert_allclose(columns["items_max"], (vectors @ items.T).max(axis=1), atol=1e-5)
    np.testing.assert_allclose(columns["background_max"], (vectors @ background.T).max(axis=1), atol=1e-5)
    if with_followups:
        assert layer.followup_vectors is not None
        near = (vectors @ layer.followup_vectors.T).max(axis=1) > (vectors @ background.T).max(axis=1)
        np.testing.assert_array_equal(followups, near)
    else:
        assert not followups.any()
    empty = layer.evaluate(np.zeros((0, encoder.dim), np.float32))
    assert [len(x) for x in empty] == [0, 0, 0, 0]
    assert empty.features.shape == (0, encoder.dim + len(FEATURE_NAMES))
