"""Real layer-3 classifier files for tests: fitted on the shared samples, written as ONNX with a card.

``write_classifier(path, guard)`` writes ``path`` (the ONNX model) and its card beside it, each replaced
atomically, as `guardrail retrain` would. ``inverted=True`` learns the labels the wrong way round, a
model that is easy to tell apart from the right one by its verdicts. Fitted models are kept per guard
document and encoder, so a test that writes many files fits each kind once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from guardrail.guard import Guard
from guardrail.layers.classifier import CARD_FORMAT, card_path
from guardrail.layers.similarity import FEATURE_NAMES
from guardrail.learning import fit, to_onnx

from samples import OFF_TOPIC, ON_TOPIC

_fitted: dict[tuple[str, str, bool], bytes] = {}


def classifier_bytes(guard: Guard, inverted: bool = False) -> bytes:
    """An ONNX classifier fitted on the samples' features under ``guard`` (labels swapped if inverted)."""
    key = (guard.encoder.id, guard.document.name, inverted)
    if key not in _fitted:
        texts = ON_TOPIC + OFF_TOPIC
        features = guard.similarity.evaluate(guard.encoder.encode(texts)).features
        labels = np.array([True] * len(ON_TOPIC) + [False] * len(OFF_TOPIC))
        model = fit(features, labels != inverted, np.ones(len(texts)), seed=0)
        _fitted[key] = to_onnx(model, features.shape[1])
    return _fitted[key]


def card_bytes(guard: Guard, threshold: float = 0.5, encoder: str | None = None) -> bytes:
    """A model card for a classifier on ``guard``'s features (or on another ``encoder``'s)."""
    card = {
        "format": CARD_FORMAT,
        "encoder": encoder if encoder is not None else guard.encoder.id,
        "features": ["embedding", *FEATURE_NAMES],
        "n_features": guard.encoder.dim + len(FEATURE_NAMES),
        "threshold": threshold,
    }
    return json.dumps(card).encode()


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new one, never half."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_classifier(
    path: Path,
    guard: Guard,
    threshold: float = 0.5,
    inverted: bool = False,
    encoder: str | None = None,
) -> Path:
    """Write a classifier and its card (model first, then card); returns ``path``."""
    replace_file(path, classifier_bytes(guard, inverted))
    replace_file(card_path(path), card_bytes(guard, threshold, encoder))
    return path
