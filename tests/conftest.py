"""Shared fixtures: one ONNX export of the packaged model per test session, and a guard built on it.

The export (torch + sentence-transformers, about 10 s) happens once into a session temporary
directory; every other test loads the exported model from there, so nothing touches ~/.cache.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from guardrail.encoder import Encoder
from guardrail.guard import Guard
from guardrail.models import DEFAULT_MODEL
from guardrail.settings import Settings

if TYPE_CHECKING:
    # The proxy's helpers pull in uvicorn and the openai SDK: only the tests that use them pay for that.
    from upstreams import FakeOpenAI, ProxyServer

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


@pytest.fixture(scope="session")
def _fake_upstream_server() -> Iterator[FakeOpenAI]:
    from upstreams import FakeOpenAI, serve

    fake = FakeOpenAI()
    with serve(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture
def fake_upstream(_fake_upstream_server: FakeOpenAI) -> FakeOpenAI:
    """A well-behaved OpenAI-compatible upstream in a real server; ``fake_upstream.url`` is its address.

    One server serves the session; each test gets it with no requests recorded and default behaviour.
    """
    _fake_upstream_server.reset()
    return _fake_upstream_server


@pytest.fixture
def start_proxy(guard: Guard, tmp_path: Path) -> Iterator[Callable[..., ProxyServer]]:
    """Start proxies for an upstream URL and settings overrides; each logs to its own file in tmp_path."""
    from upstreams import ProxyServer

    names = itertools.count()
    with contextlib.ExitStack() as stack:

        def start(upstream: str, **overrides: Any) -> ProxyServer:
            overrides.setdefault("log_path", tmp_path / f"interactions-{next(names)}.jsonl")
            settings = Settings(upstream=upstream, **overrides)
            settings.validate()
            return stack.enter_context(ProxyServer(guard, settings))

        yield start


@pytest.fixture
def proxy(start_proxy: Callable[..., ProxyServer], fake_upstream: FakeOpenAI) -> ProxyServer:
    """A proxy with default settings in front of ``fake_upstream``."""
    return start_proxy(fake_upstream.url)
