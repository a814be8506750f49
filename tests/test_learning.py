"""Layer 3's model (guardrail/learning.py) on synthetic features: deterministic, its ONNX file answers as
the fitted model does, fast enough, and sane on tiny and imbalanced labelled sets."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from guardrail.evaluation import auroc
from guardrail.learning import BANK, TopicModel, _bank_features, fit, to_onnx

pytest.importorskip("sklearn")
pytest.importorskip("onnx")

DIM = 384
WIDTH = DIM + 5


def synthetic(n_on: int, n_off: int, seed: int = 0) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Unit vectors: on topic around two nearby directions, off topic around ten others; then five
    layer-1-like columns (a noisy score and four similarities)."""
    centres = np.random.default_rng(1234).standard_normal((12, DIM))  # the same topics for every seed
    rng = np.random.default_rng(seed)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    which = np.concatenate([rng.integers(0, 2, n_on), rng.integers(2, 12, n_off)])
    vectors = centres[which] + 0.08 * rng.standard_normal((n_on + n_off, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = which < 2
    score = labels * 0.2 + 0.1 * rng.standard_normal(len(labels))
    layer1 = np.column_stack([score, *(rng.uniform(0.1, 0.6, (4, len(labels))))])
    features = np.hstack([vectors, layer1]).astype(np.float32)
    order = rng.permutation(len(labels))
    return features[order], labels[order]


def session(model: TopicModel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(to_onnx(model, WIDTH), options, providers=["CPUExecutionProvider"])


def test_fit_is_deterministic_for_a_seed() -> None:
    x, y = synthetic(40, 2000)
    weights = np.ones(len(y))
    first, second = fit(x, y, weights, seed=3), fit(x, y, weights, seed=3)
    probe, _ = synthetic(20, 100, seed=1)
    assert np.array_equal(first.predict_proba(probe), second.predict_proba(probe))
    assert to_onnx(first, WIDTH) == to_onnx(second, WIDTH)


def test_onnx_answers_as_the_fitted_model() -> None:
    x, y = synthetic(60, 1500)
    model = fit(x, y, np.ones(len(y)), seed=0)
    probe, _ = synthetic(30, 300, seed=2)
    labels, probabilities = session(model).run(None, {"features": probe})
    assert labels.shape == (len(probe),) and labels.dtype == np.int64
    assert probabilities.shape == (len(probe), 2) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, model.predict_proba(probe), atol=1e-5)
    assert np.array_equal(labels, model.predict(probe))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_it_learns_the_topic_from_five_on_topic_examples() -> None:
    x, y = synthetic(5, 300)
    model = fit(x, y, np.ones(len(y)), seed=0)
    probe, truth = synthetic(100, 1000, seed=4)
    p = model.predict_proba(probe)[:, 1]
    assert np.all(np.isfinite(p))
    assert auroc(p[truth], p[~truth]) > 0.99
    _, probabilities = session(model).run(None, {"features": probe})
    np.testing.assert_allclose(probabilities[:, 1], p, atol=1e-5)


def test_a_single_example_of_a_class_is_enough_to_fit() -> None:
    x, y = synthetic(1, 50)
    model = fit(x, y, np.ones(len(y)), seed=0)
    assert np.all(np.isfinite(model.predict_proba(x)))
    with pytest.raises(ValueError, match="on-topic and off-topic"):
        fit(x[~y], y[~y], np.ones(int((~y).sum())), seed=0)


def test_zero_weight_examples_stay_out_of_the_bank() -> None:
    x, y = synthetic(20, 200)
    weights = np.ones(len(y))
    weights[:50] = 0.0
    model = fit(x, y, weights, seed=0)
    assert len(model.bank) == int((weights > 0).sum())
    banked = {row.tobytes() for row in model.bank}
    assert not any(x[i, :DIM].tobytes() in banked for i in range(50))
    with pytest.raises(ValueError, match="positive weight"):
        fit(x, y, np.where(y, 0.0, 1.0), seed=0)


def test_the_bank_is_capped_and_keeps_the_on_topic_examples() -> None:
    x, y = synthetic(150, 2850)
    model = fit(x, y, np.ones(len(y)), seed=0)
    assert len(model.bank) == BANK
    assert model.n_on == 150  # fewer than half the bank: all of them


def test_training_features_leave_the_example_itself_out() -> None:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((6, DIM)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    log_w = np.zeros(6, np.float32)
    own = np.array([0, 4], dtype=np.intp)
    left_out = _bank_features(bank[own] @ bank.T, log_w, 3, 10.0, own)
    # Message 0 against on-topic {1, 2} and off-topic {3, 4, 5}; message 4 against {0, 1, 2} and {3, 5}.
    expected_0 = _bank_features(bank[:1] @ bank[[1, 2, 3, 4, 5]].T, log_w[:5], 2, 10.0)
    expected_4 = _bank_features(bank[4:5] @ bank[[0, 1, 2, 3, 5]].T, log_w[:5], 3, 10.0)
    np.testing.assert_allclose(left_out, np.vstack([expected_0, expected_4]), atol=1e-6)


def test_fit_time_for_three_thousand_examples() -> None:
    x, y = synthetic(150, 2850)
    started = time.perf_counter()
    fit(x, y, np.ones(len(y)), seed=0)
    assert time.perf_counter() - started < 30.0


def test_to_onnx_checks_the_width_and_still_exports_scikit_learn_models() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = synthetic(20, 200)
    with pytest.raises(ValueError, match="features"):
        to_onnx(fit(x, y, np.ones(len(y)), seed=0), WIDTH + 1)
    plain = LogisticRegression().fit(x, y)
    options = ort.SessionOptions()
    exported = ort.InferenceSession(to_onnx(plain, WIDTH), options, providers=["CPUExecutionProvider"])
    probabilities = exported.run(None, {"features": x})[-1]
    np.testing.assert_allclose(probabilities, plain.predict_proba(x), atol=1e-5)
    # The same scikit-learn model gives the same bytes: a watcher reloads only on a real change.
    assert to_onnx(plain, WIDTH) == to_onnx(plain, WIDTH)
