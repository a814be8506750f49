"""The layer-3 model: how it is fitted to labelled features, and written as ONNX.

Training only (scikit-learn and skl2onnx come with the ``train`` extra); the server runs the ONNX file
with onnxruntime alone (``guardrail/layers/classifier.py``). ``fit`` takes the features layer 1 hands
over (``Scored.features``: the embedding, then ``similarity.FEATURE_NAMES``), the labels (True: on
topic) and a weight per example, and is deterministic for a given ``seed``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from guardrail.errors import MissingExtraError


def _sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("training needs scikit-learn: pip install 'guardrail[train]'") from exc


def fit(
    features: NDArray[np.float32], labels: NDArray[np.bool_], weights: NDArray[np.float64], seed: int = 0
) -> Any:
    """A fitted scikit-learn classifier whose ``predict_proba[:, 1]`` is P(on topic)."""
    _sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    model = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "logistic",
                LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000, random_state=seed),
            ),
        ]
    )
    model.fit(features, labels.astype(np.int64), logistic__sample_weight=weights)
    return model


def to_onnx(model: Any, n_features: int) -> bytes:
    """The fitted model as an ONNX file's bytes: input ``features`` (N, n_features) float32, outputs
    ``label`` and ``probabilities`` (N, 2), without the ZipMap that would turn them into dicts."""
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError as exc:
        raise MissingExtraError(
            "exporting a classifier needs skl2onnx: pip install 'guardrail[train]'"
        ) from exc
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    onnx_model = convert_sklearn(
        model,
        initial_types=[("features", FloatTensorType([None, n_features]))],
        options={id(final): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return bytes(onnx_model.SerializeToString())
