"""GuardrailMiddleware in front of a real FastAPI chatbot, served by uvicorn in a thread.

The OpenAI-format endpoint is called with the official ``openai`` SDK, the custom JSON endpoints with
httpx. The app counts its own calls, so "never reached the app" is checked where it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.sync.client import connect

from guardrail.errors import ConfigError
from guardrail.guard import Guard
from guardrail.interactions import InteractionLog
from guardrail.middleware import GuardrailMiddleware
from guardrail.protocols import JSONFields, OpenAIChat
from guardrail.settings import DEFAULT_REFUSAL, Settings

from samples import OFF_TOPIC, ON_TOPIC
from upstreams import serve

PATHS = {
    "/v1/chat/completions": OpenAIChat(),
    "/chat": JSONFields("message", "reply"),
    "/nested": JSONFields("input.text", "output.answer"),
}
GUARDRAIL_HEADERS = {
    "x-guardrail-id",
    "x-guardrail-verdict",
    "x-guardrail-layer",
    "x-guardrail-score",
    "x-guardrail-scenario",
}
STREAM_PAUSE = 0.3  # how long the app's stream waits between its first chunks and the rest


@dataclass
class Bot:
    """What the chatbot behind the middleware saw and did."""

    paths: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    started: bool = False
    stopped: bool = False
    stream_finished: float | None = None  # time.monotonic() when the streamed answer's last chunk left

    @property
    def calls(self) -> int:
        return len(self.paths)


def answer(question: str) -> str:
    return f"Answer: {question}"


def sse(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-bot",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bot",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def chatbot(bot: Bot) -> FastAPI:
    """A stand-in chatbot app in both wire formats, with the endpoints a real one has around them."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bot.started = True
        yield
        bot.stopped = True

    app = FastAPI(lifespan=lifespan)

    async def seen(request: Request) -> Any:
        body = await request.body()
        bot.paths.append(request.url.path)
        bot.bodies.append(body)
        bot.headers.append(dict(request.headers))
        return orjson.loads(body)

    async def streamed(question: str) -> AsyncIterator[bytes]:
        yield sse({"role": "assistant", "content": ""})
        yield sse({"content": "Answer: "})
        await asyncio.sleep(STREAM_PAUSE)
        yield sse({"content": question})
        yield sse({}, "stop")
        bot.stream_finished = time.monotonic()
        yield b"data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Any:
        payload = await seen(request)
        question = payload["messages"][-1]["content"]
        if payload.get("model") == "crash":
            raise RuntimeError("the model backend is down")
        if payload.get("stream"):
            return StreamingResponse(streamed(question), media_type="text/event-stream")
        completion = {
            "id": "chatcmpl-bot",
            "object": "chat.completion",
            "created": 0,
            "model": "bot",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer(question)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        }
        return JSONResponse(completion, headers={"x-app": "chatbot"})

    @app.post("/chat")
    async def chat(request: Request) -> dict[str, str]:
        return {"reply": answer((await seen(request))["message"])}

    @app.get("/chat")
    async def history() -> dict[str, list[str]]:
        return {"history": []}

    @app.post("/nested", status_code=201)
    async def nested(request: Request) -> dict[str, Any]:
        payload = await seen(request)
        return {"output": {"answer": answer(payload["input"]["text"])}, "session": 7}

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        return await seen(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.websocket("/ws")
    async def websocket(socket: WebSocket) -> None:
        await socket.accept()
        async for text in socket.iter_text():
            await socket.send_text(f"echo: {text}")

    return app


def guarded(bot: Bot, guard: Guard, log_path: Path | None, **settings: Any) -> FastAPI:
    app = chatbot(bot)
    app.add_middleware(
        GuardrailMiddleware, guard=guard, paths=PATHS, settings=Settings(log_path=log_path, **settings)
    )
    return app


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=10)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def read_log(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


class RaisedErrors:
    """An outermost ASGI layer that records the exceptions that reach the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.errors: list[Exception] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            self.errors.append(exc)
            raise


@pytest.fixture
def bot() -> Bot:
    return Bot()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "interactions.jsonl"


@pytest.fixture
def url(bot: Bot, guard: Guard, log_path: Path) -> Iterator[str]:
    with serve(guarded(bot, guard, log_path)) as base:
        yield base


# The OpenAI format


def test_on_topic_reaches_the_app_and_gets_the_guardrail_headers(url: str, bot: Bot) -> None:
    raw = sdk(url).chat.completions.with_raw_response.create(model="bot", messages=user(ON_TOPIC[0]))
    completion = raw.parse()
    assert completion.choices[0].message.content == answer(ON_TOPIC[0])
    assert bot.paths == ["/v1/chat/completions"]
    assert raw.headers["x-app"] == "chatbot"
    assert raw.headers["x-guardrail-verdict"] == "passed"
    assert raw.headers["x-guardrail-id"].startswith("gr-")
    assert raw.headers["x-guardrail-layer"] not in ("", "none")
    assert 0.0 < float(raw.headers["x-guardrail-score"]) <= 1.0
    assert raw.headers["x-guardrail-scenario"]


def test_off_topic_gets_the_refusal_as_a_chat_completion_and_never_reaches_the_app(
    url: str, bot: Bot
) -> None:
    raw = sdk(url).chat.completions.with_raw_response.create(model="bot-1", messages=user(OFF_TOPIC[0]))
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == DEFAULT_REFUSAL
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "bot-1"
    assert completion.id == f"chatcmpl-{raw.headers['x-guardrail-id']}"
    assert raw.headers["x-guardrail-verdict"] == "blocked"
    assert set(raw.headers) >= GUARDRAIL_HEADERS
    assert bot.calls == 0


def test_a_streamed_reply_is_relayed_chunk_by_chunk(url: str, bot: Bot) -> None:
    started = time.monotonic()
    raw = sdk(url).chat.completions.with_raw_response.create(
        model="bot", messages=user(ON_TOPIC[1]), stream=True
    )
    assert raw.headers["x-guardrail-verdict"] == "passed"
    arrivals: list[float] = []
    text = ""
    for chunk in raw.parse():
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == answer(ON_TOPIC[1])
    # A buffering middleware would hand over the first chunk only after the app had finished.
    assert bot.stream_finished is not None
    assert arrivals[0] < bot.stream_finished
    assert arrivals[-1] - started >= STREAM_PAUSE


def test_a_blocked_streamed_request_gets_a_chunk_stream_the_sdk_reads(url: str, bot: Bot) -> None:
    raw = sdk(url).chat.completions.with_raw_response.create(
        model="bot", messages=user(OFF_TOPIC[1]), stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-guardrail-verdict"] == "blocked"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_REFUSAL
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 0
    assert bot.calls == 0


# Custom JSON APIs


@pytest.mark.parametrize(
    ("path", "request_of", "reply_of", "status"),
    [
        ("/chat", lambda text: {"message": text}, lambda text: {"reply": text}, 200),
        ("/nested", lambda text: {"input": {"text": text}}, lambda text: {"output": {"answer": text}}, 201),
    ],
    ids=["flat", "nested"],
)
def test_custom_json_api(
    bot: Bot, guard: Guard, log_path: Path, path: str, request_of: Any, reply_of: Any, status: int
) -> None:
    with serve(guarded(bot, guard, log_path)) as url:
        blocked = httpx.post(f"{url}{path}", json=request_of(OFF_TOPIC[2]))
        assert bot.calls == 0
        passed = httpx.post(f"{url}{path}", json=request_of(ON_TOPIC[2]))
    # Blocked: the app's own reply shape, with the refusal where its answer goes.
    assert blocked.status_code == 200
    assert blocked.json() == reply_of(DEFAULT_REFUSAL)
    assert blocked.headers["x-guardrail-verdict"] == "blocked"
    assert passed.status_code == status
    assert passed.json().items() >= reply_of(answer(ON_TOPIC[2])).items()
    assert passed.headers["x-guardrail-verdict"] == "passed"
    assert bot.paths == [path]
    records = read_log(log_path)
    assert [r["verdict"] for r in records] == ["blocked", "passed"]
    assert [r["text"] for r in records] == [OFF_TOPIC[2], ON_TOPIC[2]]
    assert [r["reply"] for r in records] == [DEFAULT_REFUSAL, answer(ON_TOPIC[2])]
    assert records[1]["upstream"]["status"] == status


# Everything else passes through untouched


def test_other_paths_and_methods_are_untouched(bot: Bot, guard: Guard, log_path: Path) -> None:
    with serve(guarded(bot, guard, log_path)) as url:
        health = httpx.get(f"{url}/health")
        # An off-topic message on a path nobody guards reaches the app as it is.
        echoed = httpx.post(f"{url}/echo", json={"message": OFF_TOPIC[3]})
        # A GET on a guarded path is the app's business.
        history = httpx.get(f"{url}/chat")
    assert health.json() == {"status": "ok"}
    assert echoed.json() == {"message": OFF_TOPIC[3]}
    assert history.json() == {"history": []}
    assert bot.paths == ["/echo"]
    for response in (health, echoed, history):
        assert response.status_code == 200
        assert not GUARDRAIL_HEADERS & set(response.headers)
    assert not log_path.exists() or not log_path.read_bytes()


def test_a_websocket_passes_through(url: str) -> None:
    with connect(f"ws{url.removeprefix('http')}/ws") as socket:
        socket.send(OFF_TOPIC[4])
        assert socket.recv(timeout=5) == f"echo: {OFF_TOPIC[4]}"


def test_the_app_lifespan_runs_and_the_log_is_flushed_at_shutdown(
    bot: Bot, guard: Guard, log_path: Path
) -> None:
    app = chatbot(bot)
    settings = Settings(log_path=log_path)
    app.add_middleware(GuardrailMiddleware, guard=guard, paths=PATHS, settings=settings)
    with serve(app) as url:
        assert bot.started
        for text in ON_TOPIC[:3] + OFF_TOPIC[:3]:
            httpx.post(f"{url}/chat", json={"message": text})
        assert not bot.stopped
    assert bot.stopped
    # The log the middleware opened from its settings was flushed by the shutdown, with no close call here.
    assert [r["text"] for r in read_log(log_path)] == ON_TOPIC[:3] + OFF_TOPIC[:3]


def test_a_log_passed_in_stays_open_after_shutdown(bot: Bot, guard: Guard, log_path: Path) -> None:
    log = InteractionLog(log_path)
    app = chatbot(bot)
    app.add_middleware(GuardrailMiddleware, guard=guard, paths=PATHS, settings=Settings(), log=log)
    with serve(app) as url:
        httpx.post(f"{url}/chat", json={"message": OFF_TOPIC[0]})
    # The caller owns it: the app's shutdown must not close it under them.
    assert log.write({"late": True}) is True
    log.close()
    assert [r.get("text") for r in read_log(log_path)] == [OFF_TOPIC[0], None]


# The request body


def test_the_app_sees_the_exact_body_bytes(bot: Bot, guard: Guard) -> None:
    # Spacing, key order, a trailing zero and an escape that any re-serialisation would change: with
    # layer 2 off, nothing may (tests/test_layer2.py covers the instruction).
    body = (
        b'{ "model" : "bot",\n  "temperature": 0.70, "messages": [ {"content": "'
        + ON_TOPIC[3].encode()
        + b'", "role": "user", "name": "caf\\u00e9"} ] }'
    )
    with serve(guarded(bot, guard, None, instruction=False)) as url:
        response = httpx.post(
            f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert response.headers["x-guardrail-verdict"] == "passed"
    assert bot.bodies == [body]


def test_a_chunked_request_body_is_reassembled(bot: Bot, guard: Guard) -> None:
    body = orjson.dumps({"model": "bot", "messages": user(ON_TOPIC[4])})
    pieces = [body[i : i + 16] for i in range(0, len(body), 16)]
    assert len(pieces) > 3

    def slowly() -> Iterator[bytes]:
        for piece in pieces:
            yield piece
            time.sleep(0.005)

    with serve(guarded(bot, guard, None, instruction=False)) as url:
        response = httpx.post(f"{url}/v1/chat/completions", content=slowly())
    assert response.json()["choices"][0]["message"]["content"] == answer(ON_TOPIC[4])
    assert bot.bodies == [body]
    assert bot.headers[0].get("transfer-encoding") == "chunked"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_refused_with_413(bot: Bot, guard: Guard, chunked: bool) -> None:
    body = orjson.dumps({"model": "bot", "messages": user(ON_TOPIC[0] + " " * 4000)})
    content: bytes | Iterator[bytes] = body
    if chunked:
        content = iter([body[i : i + 1024] for i in range(0, len(body), 1024)])
    with serve(guarded(bot, guard, None, max_body_bytes=2048)) as url:
        response = httpx.post(f"{url}/v1/chat/completions", content=content)
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert "2048" in response.json()["error"]["message"]
        # The server still answers the next request.
        assert httpx.get(f"{url}/health").status_code == 200
    assert bot.calls == 0


def test_a_body_at_the_limit_is_accepted(bot: Bot, guard: Guard) -> None:
    body = orjson.dumps({"model": "bot", "messages": user(ON_TOPIC[0])})
    body = body[:-1] + b" " * (2048 - len(body)) + b"}"
    assert len(body) == 2048
    with serve(guarded(bot, guard, None, max_body_bytes=2048, instruction=False)) as url:
        response = httpx.post(f"{url}/v1/chat/completions", content=body)
    assert response.status_code == 200
    assert bot.bodies == [body]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'{"messages": []}'])
def test_a_malformed_body_gets_an_openai_style_400(url: str, bot: Bot, body: bytes) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert bot.calls == 0


def test_the_sdk_raises_its_bad_request_error_for_a_400(url: str, bot: Bot) -> None:
    # A message that is neither a string nor a list of parts.
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(url).chat.completions.create(model="bot", messages=[{"role": "user", "content": 42}])  # type: ignore[list-item]
    assert "content" in str(caught.value)
    assert bot.calls == 0


# Shadow mode


def test_shadow_mode_lets_off_topic_through_marked_would_block(
    bot: Bot, guard: Guard, log_path: Path
) -> None:
    with serve(guarded(bot, guard, log_path, mode="shadow")) as url:
        raw = sdk(url).chat.completions.with_raw_response.create(model="bot", messages=user(OFF_TOPIC[5]))
        on = sdk(url).chat.completions.with_raw_response.create(model="bot", messages=user(ON_TOPIC[5]))
    assert raw.parse().choices[0].message.content == answer(OFF_TOPIC[5])
    assert raw.headers["x-guardrail-verdict"] == "would-block"
    assert on.headers["x-guardrail-verdict"] == "passed"
    assert bot.calls == 2
    records = read_log(log_path)
    assert [(r["verdict"], r["mode"]) for r in records] == [("would-block", "shadow"), ("passed", "shadow")]
    assert records[0]["reply"] == answer(OFF_TOPIC[5])


# The interaction log


def test_one_record_per_guarded_request(bot: Bot, guard: Guard, log_path: Path) -> None:
    with serve(guarded(bot, guard, log_path)) as url:
        client = sdk(url)
        passed = client.chat.completions.with_raw_response.create(model="bot", messages=user(ON_TOPIC[6]))
        blocked = client.chat.completions.with_raw_response.create(model="bot", messages=user(OFF_TOPIC[6]))
        streamed = client.chat.completions.with_raw_response.create(
            model="bot", messages=user(ON_TOPIC[7]), stream=True
        )
        list(streamed.parse())
        httpx.get(f"{url}/health")
    records = {r["id"]: r for r in read_log(log_path)}
    assert len(records) == 3
    first = records[passed.headers["x-guardrail-id"]]
    assert first["verdict"] == "passed"
    assert first["text"] == ON_TOPIC[6]
    assert first["reply"] == answer(ON_TOPIC[6])
    assert first["path"] == "/v1/chat/completions"
    assert first["upstream"] == {
        "status": 200,
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        "error": None,
    }
    assert first["latency_ms"]["guard"] > 0
    assert first["latency_ms"]["total"] >= first["latency_ms"]["upstream_first_byte"] > 0
    second = records[blocked.headers["x-guardrail-id"]]
    assert (second["verdict"], second["text"], second["reply"]) == ("blocked", OFF_TOPIC[6], DEFAULT_REFUSAL)
    assert second["upstream"]["status"] is None
    third = records[streamed.headers["x-guardrail-id"]]
    assert (third["stream"], third["reply"]) == (True, answer(ON_TOPIC[7]))
    assert third["latency_ms"]["total"] >= STREAM_PAUSE * 1000


def test_an_app_exception_is_logged_and_still_surfaces_as_a_500(
    bot: Bot, guard: Guard, log_path: Path
) -> None:
    server = RaisedErrors(guarded(bot, guard, log_path))
    with serve(server) as url:
        with pytest.raises(openai.InternalServerError) as caught:
            sdk(url).chat.completions.create(model="crash", messages=user(ON_TOPIC[8]))
        assert caught.value.status_code == 500
        assert httpx.get(f"{url}/health").status_code == 200
    assert bot.calls == 1
    # Not swallowed: the exception went on up to the server.
    assert [str(e) for e in server.errors] == ["the model backend is down"]
    [record] = read_log(log_path)
    assert record["verdict"] == "passed"
    assert record["upstream"]["error"] == "the app raised RuntimeError: the model backend is down"
    assert record["upstream"]["status"] is None


# Known bugs


def test_a_mounted_app_is_still_guarded(bot: Bot, guard: Guard) -> None:
    outer = FastAPI()
    outer.mount("/api", guarded(bot, guard, None))
    with serve(outer) as url:
        response = httpx.post(f"{url}/api/chat", json={"message": OFF_TOPIC[8]})
    assert response.json() == {"reply": DEFAULT_REFUSAL}
    assert bot.calls == 0


def test_a_mounted_app_without_lifespan_events_writes_its_log_at_exit(
    cache_env: Path, real_estate_path: Path, log_path: Path
) -> None:
    # A mounted app gets no lifespan events, so nothing shuts its log down before the process ends.
    script = f"""
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from guardrail.middleware import GuardrailMiddleware
from guardrail.settings import Settings


async def chat(request):
    return JSONResponse({{"choices": [{{"message": {{"role": "assistant", "content": "Sure."}}}}]}})


bot = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
settings = Settings.load(scenario={str(real_estate_path)!r}, log_path={str(log_path)!r})
bot.add_middleware(GuardrailMiddleware, settings=settings)
client = TestClient(Starlette(routes=[Mount("/api", bot)]))  # not entered: no lifespan events
for text in ({OFF_TOPIC[0]!r}, {ON_TOPIC[0]!r}):
    messages = [{{"role": "user", "content": text}}]
    response = client.post("/api/v1/chat/completions", json={{"messages": messages}})
    print(response.headers["x-guardrail-verdict"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["blocked", "passed"]
    assert [record["verdict"] for record in read_log(log_path)] == ["blocked", "passed"]


def test_an_app_served_twice_still_guards_and_logs(bot: Bot, guard: Guard, log_path: Path) -> None:
    app = guarded(bot, guard, log_path)
    for _ in range(2):
        with serve(app) as url:
            response = httpx.post(f"{url}/chat", json={"message": ON_TOPIC[9]})
            assert response.status_code == 200
    assert len(read_log(log_path)) == 2


def test_the_reply_of_a_compressed_response_is_logged(bot: Bot, guard: Guard, log_path: Path) -> None:
    app = chatbot(bot)
    app.add_middleware(GZipMiddleware, minimum_size=10)
    app.add_middleware(GuardrailMiddleware, guard=guard, paths=PATHS, settings=Settings(log_path=log_path))
    with serve(app) as url:
        response = httpx.post(f"{url}/chat", json={"message": ON_TOPIC[9]})
    assert response.headers["content-encoding"] == "gzip"
    assert response.json() == {"reply": answer(ON_TOPIC[9])}
    assert read_log(log_path)[0]["reply"] == answer(ON_TOPIC[9])


# Construction


def test_without_a_scenario_or_a_guard_it_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="scenario"):
        GuardrailMiddleware(chatbot(Bot()), settings=Settings(log_path=None))
    with pytest.raises(ConfigError, match="scenario"):
        GuardrailMiddleware(chatbot(Bot()))


def test_paths_as_one_string_is_a_type_error(guard: Guard) -> None:
    with pytest.raises(TypeError, match="paths"):
        GuardrailMiddleware(chatbot(Bot()), guard=guard, paths="/chat", settings=Settings(log_path=None))


def test_a_scenario_path_loads_the_guard(cache_env: Path, real_estate_path: Path, bot: Bot) -> None:
    app = chatbot(bot)
    app.add_middleware(GuardrailMiddleware, scenario=real_estate_path, settings=Settings(log_path=None))
    with serve(app) as url:
        blocked = httpx.post(f"{url}/v1/chat/completions", json={"messages": user(OFF_TOPIC[7])})
    assert blocked.headers["x-guardrail-verdict"] == "blocked"
    assert bot.calls == 0


class _BrokenGuard:
    """A guard whose encoder fails: a corrupt model or a bug, as the middleware sees it."""

    def __init__(self, guard: Guard) -> None:
        self.document = guard.document

    def judge_many(self, queries: object) -> list[object]:
        raise RuntimeError("the encoder broke")


def test_a_failing_guard_answers_a_clean_500_and_never_calls_the_app(bot: Bot, guard: Guard) -> None:
    app = chatbot(bot)
    app.add_middleware(
        GuardrailMiddleware, guard=_BrokenGuard(guard), paths=PATHS, settings=Settings(log_path=None)
    )
    with serve(app) as url:
        response = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "bot", "messages": user(ON_TOPIC[0])}
        )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert "could not judge" in error["message"] and "Traceback" not in response.text
    assert bot.calls == 0
