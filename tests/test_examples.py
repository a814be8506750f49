"""The FastAPI example does what its docstring promises, served by uvicorn and called as its clients would."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import openai
import orjson
import pytest

from guardrail.settings import DEFAULT_REFUSAL

from samples import OFF_TOPIC, ON_TOPIC
from upstreams import serve

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app.py"


def load_example() -> ModuleType:
    """Import examples/fastapi_app.py by path: examples/ is not a package."""
    spec = importlib.util.spec_from_file_location("guardrail_example_fastapi_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def log_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "interactions.jsonl"
    monkeypatch.setenv("GUARDRAIL_LOG_PATH", str(path))
    return path


@pytest.fixture
def url(cache_env: Path, log_path: Path, real_estate_path: Path) -> Iterator[str]:
    example = load_example()
    with serve(example.create_app(real_estate_path)) as base:
        yield base


def test_the_module_app_guards_the_shipped_scenario(cache_env: Path, log_path: Path) -> None:
    example = load_example()
    assert example.SCENARIO.is_file()
    with serve(example.app) as url:
        response = httpx.post(f"{url}/chat", json={"message": OFF_TOPIC[0]})
    assert response.json() == {"reply": DEFAULT_REFUSAL}


def test_chat_answers_on_topic_and_refuses_off_topic(url: str) -> None:
    on = httpx.post(f"{url}/chat", json={"message": ON_TOPIC[0]})
    off = httpx.post(f"{url}/chat", json={"message": OFF_TOPIC[0]})
    assert on.json() == {"reply": f"Happy to help with: {ON_TOPIC[0]}"}
    assert on.headers["x-guardrail-verdict"] == "passed"
    assert off.json() == {"reply": DEFAULT_REFUSAL}
    assert off.headers["x-guardrail-verdict"] == "blocked"


def test_chat_completions_through_the_openai_sdk(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-example", max_retries=0, timeout=10)
    on = client.chat.completions.with_raw_response.create(
        model="example", messages=[{"role": "user", "content": ON_TOPIC[1]}]
    )
    off = client.chat.completions.with_raw_response.create(
        model="example", messages=[{"role": "user", "content": OFF_TOPIC[1]}]
    )
    assert on.parse().choices[0].message.content == f"Happy to help with: {ON_TOPIC[1]}"
    assert on.headers["x-guardrail-verdict"] == "passed"
    assert off.parse().choices[0].message.content == DEFAULT_REFUSAL
    assert off.headers["x-guardrail-verdict"] == "blocked"


def test_chat_completions_stream_through_the_openai_sdk(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-example", max_retries=0, timeout=10)

    def streamed(text: str) -> str:
        stream = client.chat.completions.create(
            model="example", messages=[{"role": "user", "content": text}], stream=True
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert streamed(ON_TOPIC[2]) == f"Happy to help with: {ON_TOPIC[2]}"
    assert streamed(OFF_TOPIC[2]) == DEFAULT_REFUSAL


def test_health_is_not_guarded(url: str) -> None:
    response = httpx.get(f"{url}/health")
    assert response.json() == {"status": "ok"}
    assert "x-guardrail-verdict" not in response.headers


def test_the_interactions_are_logged_where_the_environment_says(
    cache_env: Path, log_path: Path, real_estate_path: Path
) -> None:
    example = load_example()
    with serve(example.create_app(real_estate_path)) as url:
        httpx.post(f"{url}/chat", json={"message": ON_TOPIC[2]})
        httpx.post(f"{url}/chat", json={"message": OFF_TOPIC[2]})
    records = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [(r["text"], r["verdict"]) for r in records] == [
        (ON_TOPIC[2], "passed"),
        (OFF_TOPIC[2], "blocked"),
    ]
    assert [r["reply"] for r in records] == [f"Happy to help with: {ON_TOPIC[2]}", DEFAULT_REFUSAL]
