from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from guardrail.encoder import Encoder
from guardrail.errors import ConfigError
from guardrail.layers.similarity import Calibration, SimilarityLayer, load_background, softmax_pool
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
        0.5, "setting", layer.calibration.document_quantile, layer.calibration.background_quantile
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


def test_background_embeddings_are_cached_beside_the_export(
    layer: SimilarityLayer, document: ScenarioDocument, encoder: Encoder
) -> None:
    assert encoder.path is not None
    cached = list(encoder.path.glob("texts-*.npy"))
    assert len(cached) == 1
    vectors = np.load(cached[0])
    assert vectors.shape == (len(load_background()), 384)
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
