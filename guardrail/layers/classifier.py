"""Layer 3: a binary on-topic classifier, trained by `guardrail retrain` from logged interactions.

Its input is what the guard already has for every message, at no extra encoder cost: the embedding and
layer 1's features (``similarity.FEATURE_NAMES``: the layer-1 score, the pooled similarities to the
document and to the background, and the nearest of each). Its output is the probability that the
message is on topic. The model is an ONNX file (scikit-learn through skl2onnx, ``zipmap=False``) with a
model card beside it, ``<name>.json``, which says what it was trained on and where its threshold is.

When a classifier is loaded it makes the decision: it sees layer 1's score among its inputs, so it
keeps what layer 1 knows and adds what the logs taught it, and `guardrail retrain` only promotes a
model that beats the one in place (layer 1 alone, the first time) on held-back data. A blocked
message is put down to layer 1 when layer 1 alone would have blocked it too, else to layer 3.

``Classifier.load`` refuses a model it cannot trust to mean the same thing here: a card of another
format, another encoder (its embeddings would be another space), another input width, or an ONNX file
that does not load or answer. The running guard then keeps the model it has (see ``Guard.reload``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from guardrail.errors import ModelError
from guardrail.layers.similarity import FEATURE_NAMES

CARD_FORMAT = "guardrail-classifier/1"


def card_path(model: Path) -> Path:
    """Where a model's card is: beside it, ``.json`` for ``.onnx``."""
    return model.with_suffix(".json")


@dataclass(frozen=True)
class Classifier:
    """A loaded layer-3 model: ``predict`` gives each message's probability of being on topic."""

    path: Path
    card: dict[str, Any]
    threshold: float
    session: ort.InferenceSession
    stamp: tuple[int, int]  # the file's (mtime_ns, size) when loaded, to notice a new one
    input: str  # the graph's input name, read once: get_inputs() builds a list at every call

    @classmethod
    def load(cls, path: Path | str, encoder_id: str, dim: int, threshold: float | None = None) -> Classifier:
        """Load and check a model and its card; ``threshold`` overrides the card's."""
        path = Path(path)
        try:
            stat = os.stat(path)
            data = path.read_bytes()
            card = json.loads(card_path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelError(f"classifier {path}: {exc.filename} does not exist") from exc
        except (OSError, ValueError) as exc:
            raise ModelError(f"classifier {path}: cannot read its model card: {exc}") from exc
        if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
            raise ModelError(f"classifier {path}: the model card is not a {CARD_FORMAT} card")
        digest = card.get("model_sha256")
        if digest is not None and digest != hashlib.sha256(data).hexdigest():
            # A reload that lands between `guardrail retrain`'s two renames sees a new card beside the
            # old model (or the reverse): refused, and loaded once both are in place.
            raise ModelError(f"classifier {path}: its model card is for another model file (mid-update?)")
        if card.get("encoder") != encoder_id:
            raise ModelError(
                f"classifier {path} was trained on the embeddings of {card.get('encoder')}, "
                f"not of {encoder_id}: retrain it with this encoder"
            )
        width = dim + len(FEATURE_NAMES)
        if card.get("features") != ["embedding", *FEATURE_NAMES] or card.get("n_features") != width:
            raise ModelError(
                f"classifier {path}: its inputs are not the {width} features this guard computes"
            )
        if threshold is None:
            threshold = card.get("threshold")
        if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ModelError(f"classifier {path}: threshold must be a number in [0, 1], got {threshold!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # microseconds of work: more threads would only spin
        options.inter_op_num_threads = 1
        try:
            # From the bytes read (and hashed) above, not the path: the file may be replaced meanwhile.
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"classifier {path}: onnxruntime cannot load it: {exc}") from exc
        stamp = (stat.st_mtime_ns, stat.st_size)
        classifier = cls(path, card, float(threshold), session, stamp, session.get_inputs()[0].name)
        try:
            probe = classifier.predict(np.zeros((2, width), np.float32))
        except Exception as exc:
            raise ModelError(f"classifier {path}: it does not run on {width} features: {exc}") from exc
        if probe.shape != (2,) or not np.all((probe >= 0) & (probe <= 1)):
            raise ModelError(f"classifier {path}: it does not answer with one probability per message")
        return classifier

    @property
    def name(self) -> str:
        """The model file's name without its suffix, for headers, logs and metrics."""
        return self.path.stem

    def predict(self, features: NDArray[np.float32]) -> NDArray[np.float32]:
        """The probability that each message is on topic, from ``Scored.features``."""
        outputs = self.session.run(None, {self.input: np.ascontiguousarray(features, dtype=np.float32)})
        # skl2onnx with zipmap=False: (labels, probabilities), classes in order: off topic, on topic.
        probabilities = np.asarray(outputs[-1], dtype=np.float32)
        return probabilities[:, 1] if probabilities.ndim == 2 else probabilities
