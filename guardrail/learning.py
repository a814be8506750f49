"""The layer-3 model: how it is fitted to labelled features, and written as ONNX.

Training only (scikit-learn and skl2onnx come with the ``train`` extra); the server runs the
ONNX file with onnxruntime alone (``guardrail/layers/classifier.py``). ``fit`` takes the features layer 1
hands over (``Scored.features``: the embedding, then ``similarity.FEATURE_NAMES``), the labels (True: on
topic) and a weight per example, and is deterministic for a given ``seed``.

The model is a logistic regression on the features plus five more that measure the message against the
labelled examples themselves, the way layer 1 measures it against the scenario document::

    on  = pool(cosines to the labelled on-topic examples)
    off = pool(cosines to the labelled off-topic examples)
    pool(c) = log(sum(w * exp(tau * c)) / sum(w)) / tau        (layer 1's softmax pool, weighted)

and the extra features are ``on - off``, ``on``, ``off`` and the largest single cosine to each side. This
is a kernel density ratio with the labelled messages as its two samples: it follows the scope as the
users phrase it, several small clusters of requests included, where a linear model on 384 dimensions
needs many more examples to draw the same boundary. On the 13 HWU64 development bots (test split, 3
seeds) it lifts mean AUROC / block@95 with 300 labels from 0.991 / 95.4%, for the previous standardized
logistic regression on the features, to 0.994 / 97.8%, and with 3,000 labels from 0.992 / 95.5% to
0.997 / 98.4% (benchmarks/learning_curve_hwu64.py).

- While fitting, each labelled example is measured leave-one-out (against the others), as an unseen
  message would be against all of them; otherwise its own cosine of 1 would be all the model learns.
- The labelled examples kept for the comparison (the bank) are at most ``BANK`` (1,024): 1.5 MB of
  float32 vectors read for every message, about 0.15 ms with cold caches. A larger labelled set keeps
  every on-topic example up to half the bank and a seeded random sample of the rest; on the development
  bots a bank of 1,024 out of 3,000 examples loses under 0.0005 AUROC.
- The embedding enters unscaled (it is a unit vector already); layer 1's five features and the five above
  are standardized. ``C`` is scikit-learn's default of 1 with balanced class weights: on the development
  bots every C from 0.3 to 3 gave the same mean AUROC, and choosing C by inner cross-validation on the
  labelled set did no better, so the default stays.

The ONNX graph is written here, by the same small writer as layer 1's (``layers/onnx_graph.py``), rather
than by skl2onnx: one matrix product against the bank (zero rows
for the five layer-1 columns, so no slicing), the pools, and the logistic regression with the
standardization folded into its weights. Its outputs are those skl2onnx gives with ``zipmap=False``:
``label`` (N,) int64 and ``probabilities`` (N, 2), off topic then on topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guardrail.errors import MissingExtraError
from guardrail.layers import onnx_graph as g

BANK = 1024  # labelled examples the model compares each message with (see the module docstring)
TAU = 10.0  # the pool's temperature: layer 1's (similarity.TAU)
C = 1.0  # inverse regularisation strength of the logistic regression: scikit-learn's default
EXTRA_NAMES = (
    "labelled_ratio",
    "labelled_on_pool",
    "labelled_off_pool",
    "labelled_on_max",
    "labelled_off_max",
)


@dataclass(frozen=True)
class TopicModel:
    """A fitted layer-3 model; ``predict_proba`` follows scikit-learn (columns: off topic, on topic).

    ``bank`` holds the compared labelled embeddings, on-topic ones first (``n_on`` of them), with
    ``log_weights`` their log weights; ``coef`` weighs the input features and ``extra_coef`` the five
    features against the bank (``EXTRA_NAMES``), standardization folded in, plus ``intercept``.
    """

    dim: int
    bank: NDArray[np.float32]  # (B, dim)
    log_weights: NDArray[np.float32]  # (B,)
    n_on: int
    coef: NDArray[np.float64]  # (n_features,)
    extra_coef: NDArray[np.float64]  # (5,)
    intercept: float
    tau: float = TAU

    @property
    def classes_(self) -> NDArray[np.int64]:
        """As scikit-learn's: the classes in ``predict_proba``'s column order, off topic then on topic."""
        return np.array([0, 1], dtype=np.int64)

    @property
    def n_features(self) -> int:
        """The width of the input: embedding plus layer 1's features."""
        return len(self.coef)

    def extra(self, features: NDArray[np.float32]) -> NDArray[np.float64]:
        """The five features against the bank (``EXTRA_NAMES``), for messages not in it."""
        cosines = np.asarray(features, dtype=np.float32)[:, : self.dim] @ self.bank.T
        return _bank_features(cosines, self.log_weights, self.n_on, self.tau)

    def decision_function(self, features: NDArray[np.float32]) -> NDArray[np.float64]:
        """The logit of P(on topic)."""
        features = np.asarray(features, dtype=np.float32)
        logits = features.astype(np.float64) @ self.coef + self.extra(features) @ self.extra_coef
        return np.asarray(logits + self.intercept, dtype=np.float64)

    def predict_proba(self, features: NDArray[np.float32]) -> NDArray[np.float64]:
        """(N, 2): P(off topic), P(on topic)."""
        on = 1.0 / (1.0 + np.exp(-self.decision_function(features)))
        return np.column_stack([1.0 - on, on])

    def predict(self, features: NDArray[np.float32]) -> NDArray[np.int64]:
        """1 for on topic, 0 for off topic, at P = 0.5."""
        return (self.decision_function(features) > 0).astype(np.int64)


def _pool(cosines: NDArray[np.float32], log_weights: NDArray[np.float32], tau: float) -> NDArray[np.float64]:
    """Weighted softmax pool of each row: log(sum(w * exp(tau * c)) / sum(w)) / tau; -inf weights drop."""
    z = tau * cosines.astype(np.float64) + log_weights
    top = z.max(axis=1, keepdims=True)
    total = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    norm = np.log(np.exp(log_weights - log_weights.max(axis=1, keepdims=True)).sum(axis=1))
    norm += log_weights.max(axis=1)
    return np.asarray((total - norm) / tau, dtype=np.float64)


def _bank_features(
    cosines: NDArray[np.float32],
    log_weights: NDArray[np.float32],
    n_on: int,
    tau: float,
    own: NDArray[np.intp] | None = None,
) -> NDArray[np.float64]:
    """EXTRA_NAMES from the cosines (N, B) of messages to the bank. ``own[i]`` is the bank column of
    message i itself (or -1): that column is left out, as if the message were unseen."""
    lw = np.broadcast_to(log_weights.astype(np.float32), cosines.shape).copy()
    masked = cosines.astype(np.float32, copy=True)
    if own is not None:
        rows = np.flatnonzero(own >= 0)
        lw[rows, own[rows]] = -np.inf
        masked[rows, own[rows]] = -1.0  # the lowest cosine: never the max
    columns = []
    for side in (slice(0, n_on), slice(n_on, cosines.shape[1])):
        c, w = masked[:, side], lw[:, side]
        # A side with nothing left (its only example, left out) is as far as a cosine can be.
        empty = np.asarray(~np.isfinite(w).any(axis=1), dtype=bool)
        w = np.where(empty[:, None], np.float32(0.0), w)
        pooled = np.where(empty, -1.0, _pool(c, w, tau))
        columns.append((pooled, np.where(empty, -1.0, c.max(axis=1).astype(np.float64))))
    (on_pool, on_max), (off_pool, off_max) = columns
    return np.column_stack([on_pool - off_pool, on_pool, off_pool, on_max, off_max])


def _choose_bank(labels: NDArray[np.bool_], usable: NDArray[np.bool_], seed: int) -> NDArray[np.intp]:
    """Indices of the examples the model keeps to compare messages with: on-topic ones first, at most
    BANK in all, on-topic ones up to half of it (more when off-topic ones are fewer)."""
    on = np.flatnonzero(labels & usable)
    off = np.flatnonzero(~labels & usable)
    if len(on) + len(off) > BANK:
        rng = np.random.default_rng(seed)
        keep_on = min(len(on), max(BANK // 2, BANK - len(off)))
        on = np.sort(rng.choice(on, keep_on, replace=False))
        off = np.sort(rng.choice(off, BANK - keep_on, replace=False))
    return np.concatenate([on, off]).astype(np.intp)


def fit(
    features: NDArray[np.float32], labels: NDArray[np.bool_], weights: NDArray[np.float64], seed: int = 0
) -> TopicModel:
    """A fitted model whose ``predict_proba[:, 1]`` is P(on topic) (see the module docstring)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise MissingExtraError("training needs scikit-learn: pip install 'guardrail[train]'") from exc
    from guardrail.layers.similarity import FEATURE_NAMES

    features = np.ascontiguousarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=bool)
    weights = np.asarray(weights, dtype=np.float64)
    if features.ndim != 2 or len(features) != len(labels) or len(labels) != len(weights):
        raise ValueError("features, labels and weights must describe the same examples")
    usable = weights > 0
    if not (labels & usable).any() or not (~labels & usable).any():
        raise ValueError("fitting needs on-topic and off-topic examples of positive weight")
    dim = features.shape[1] - len(FEATURE_NAMES)
    if dim <= 0:
        raise ValueError(f"expected the embedding and {len(FEATURE_NAMES)} layer-1 features")

    chosen = _choose_bank(labels, usable, seed)
    n_on = int(labels[chosen].sum())
    bank = features[chosen, :dim]
    log_weights = np.log(weights[chosen]).astype(np.float32)
    own = np.full(len(labels), -1, dtype=np.intp)
    own[chosen] = np.arange(len(chosen))
    extra = _bank_features(features[:, :dim] @ bank.T, log_weights, n_on, TAU, own)

    scaled = np.hstack([features[:, dim:].astype(np.float64), extra])
    mean = scaled.mean(axis=0)
    scale = scaled.std(axis=0)
    scale[scale < 1e-12] = 1.0
    design = np.hstack([features[:, :dim].astype(np.float64), (scaled - mean) / scale])
    logistic = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, random_state=seed)
    logistic.fit(design, labels.astype(np.int64), sample_weight=weights)

    w = logistic.coef_[0].astype(np.float64)
    folded = w[dim:] / scale
    n_layer1 = features.shape[1] - dim
    return TopicModel(
        dim=dim,
        bank=np.ascontiguousarray(bank),
        log_weights=log_weights,
        n_on=n_on,
        coef=np.concatenate([w[:dim], folded[:n_layer1]]),
        extra_coef=folded[n_layer1:],
        intercept=float(logistic.intercept_[0] - folded @ mean),
    )


def to_onnx(model: Any, n_features: int) -> bytes:
    """The fitted model as an ONNX file's bytes: input ``features`` (N, n_features) float32, outputs
    ``label`` (N,) int64 and ``probabilities`` (N, 2) float32, off topic then on topic.

    A ``TopicModel`` is written here; any other scikit-learn classifier goes through skl2onnx without
    the ZipMap that would turn its outputs into dicts."""
    if isinstance(model, TopicModel):
        return _topic_onnx(model, n_features)
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
        # Otherwise the graph is named with a fresh UUID: the same model would give other bytes.
        name="guardrail-classifier",
    )
    return bytes(onnx_model.SerializeToString())


def _topic_onnx(model: TopicModel, n_features: int) -> bytes:
    if n_features != model.n_features:
        raise ValueError(f"the model takes {model.n_features} features, not {n_features}")
    n_on, n_bank = model.n_on, len(model.bank)
    # The bank against the whole feature row: zero rows for layer 1's columns.
    against = np.zeros((n_features, n_bank), dtype=np.float32)
    against[: model.dim] = model.bank.T
    lw_on, lw_off = model.log_weights[:n_on], model.log_weights[n_on:]

    def logsumexp(x: NDArray[np.float32]) -> float:
        return float(np.log(np.exp(x.astype(np.float64) - x.max()).sum()) + x.max())

    def const(value: Any, dtype: type = np.float32) -> Any:
        return np.asarray(value, dtype=dtype)

    constants = {
        "bank": const(against),
        "tau": const(model.tau),
        "log_w_on": const(lw_on.reshape(1, -1)),
        "log_w_off": const(lw_off.reshape(1, -1)),
        "norm_on": const(logsumexp(lw_on)),
        "norm_off": const(logsumexp(lw_off)),
        "on_start": const([0], np.int64),
        "on_end": const([n_on], np.int64),
        "off_start": const([n_on], np.int64),
        "off_end": const([n_bank], np.int64),
        "axis_1": const([1], np.int64),
        "coef": const(model.coef.reshape(-1, 1)),
        "extra_coef": const(model.extra_coef.reshape(-1, 1)),
        "intercept": const(model.intercept),
        "one": const(1.0),
        "zero": const(0.0),
        "flat": const([-1], np.int64),
    }
    n = g.node
    nodes = [n("MatMul", ["features", "bank"], ["cosines"])]
    for side in ("on", "off"):
        nodes += [
            n("Slice", ["cosines", f"{side}_start", f"{side}_end", "axis_1"], [f"c_{side}"]),
            n("Mul", [f"c_{side}", "tau"], [f"t_{side}"]),
            n("Add", [f"t_{side}", f"log_w_{side}"], [f"z_{side}"]),
            n("ReduceLogSumExp", [f"z_{side}", "axis_1"], [f"lse_{side}"], keepdims=1),
            n("Sub", [f"lse_{side}", f"norm_{side}"], [f"s_{side}"]),
            n("Div", [f"s_{side}", "tau"], [f"pool_{side}"]),
            n("ReduceMax", [f"c_{side}", "axis_1"], [f"max_{side}"], keepdims=1),
        ]
    nodes += [
        n("Sub", ["pool_on", "pool_off"], ["ratio"]),
        n("Concat", ["ratio", "pool_on", "pool_off", "max_on", "max_off"], ["extra"], axis=1),
        n("MatMul", ["features", "coef"], ["linear"]),
        n("MatMul", ["extra", "extra_coef"], ["linear_extra"]),
        n("Add", ["linear", "linear_extra"], ["sum"]),
        n("Add", ["sum", "intercept"], ["logit"]),
        n("Sigmoid", ["logit"], ["p_on"]),
        n("Sub", ["one", "p_on"], ["p_off"]),
        n("Concat", ["p_off", "p_on"], ["probabilities"], axis=1),
        n("Greater", ["logit", "zero"], ["above"]),
        n("Cast", ["above"], ["label_column"], to=g.INT64),
        n("Reshape", ["label_column", "flat"], ["label"]),
    ]
    return g.model(
        "guardrail-classifier",
        nodes,
        inputs=[g.value_info("features", g.FLOAT, ["N", n_features])],
        outputs=[g.value_info("label", g.INT64, ["N"]), g.value_info("probabilities", g.FLOAT, ["N", 2])],
        initializers=[g.tensor(name, value) for name, value in constants.items()],
    )
