"""Shared fixtures: one ONNX export of the packaged model per test session, and a guard built on it.

The export (torch + sentence-transformers, about 10 s) happens once into a session temporary
directory; every other test loads the exported model from there, so nothing touches ~/.cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from guardrail.encoder import Encoder
from guardrail.guard import Guard
from guardrail.models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_guardrail_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GUARDRAIL_* variable in the developer's shell must not change what a test sees."""
    for name in list(os.environ):
        if name.startswith("GUARDRAIL_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A warm cache directory: the default model exported to ONNX once for the whole session."""
    cache_dir = tmp_path_factory.mktemp("guardrail-cache")
    with pytest.MonkeyPatch.context() as mp:
        # The packaged model is local; make sure nothing in the export path tries the network.
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        Encoder.load(DEFAULT_MODEL, cache_dir=cache_dir)
    yield cache_dir


@pytest.fixture(scope="session")
def encoder(model_cache: Path) -> Encoder:
    """The exported default encoder, loaded from the warm cache (never re-exported)."""
    return Encoder.load(DEFAULT_MODEL, cache_dir=model_cache, export=False)


@pytest.fixture(scope="session")
def real_estate_path() -> Path:
    """The shipped real-estate scenario document."""
    return ROOT / "scenarios" / "real_estate.md"


@pytest.fixture(scope="session")
def guard(model_cache: Path, real_estate_path: Path) -> Guard:
    """A guard for the real-estate scenario, on the warm cache."""
    return Guard.load(real_estate_path, cache_dir=model_cache)


@pytest.fixture
def cache_env(monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> Path:
    """Point GUARDRAIL_CACHE_DIR at the warm cache, for the CLI and subprocesses."""
    monkeypatch.setenv("GUARDRAIL_CACHE_DIR", str(model_cache))
    return model_cache
