"""Real local servers for the proxy tests: a uvicorn runner, a fake OpenAI upstream and fault injectors.

``serve`` runs any ASGI app (the proxy itself, or the fake upstream) in a real uvicorn server on its own
thread and event loop. ``FakeOpenAI`` is a well-behaved OpenAI-compatible upstream that records every
request it receives. ``RawUpstream`` is a hand-written HTTP/1.1 server on a raw asyncio socket, for the
faults a framework would tidy away: never answering, stalling after the headers, cutting a body off by
closing the connection, and noticing the moment its client hangs up. ``closed_port`` is where nothing
listens. ``ProxyServer`` is the proxy app under test, served the same way, with clients for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import orjson
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from guardrail.guard import Guard
from guardrail.proxy import create_app
from guardrail.settings import Settings

# A recognisable secret: the interaction log must never contain it.
API_KEY = "sk-guardrail-test-5f0c1e2d3b4a69788796a5b4"

UPSTREAM_REPLY = "The flat on Station Road is still available from the first of June."
UPSTREAM_USAGE = {"prompt_tokens": 21, "completion_tokens": 13, "total_tokens": 34}
UPSTREAM_ERROR = {
    "error": {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


@dataclass(frozen=True)
class Recorded:
    """One request as it arrived at an upstream."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]  # names lower-cased, in arrival order
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of a header, or None."""
        return next((v for k, v in self.headers if k == name.lower()), None)

    def json(self) -> Any:
        return orjson.loads(self.body)


class _Server(uvicorn.Server):
    """uvicorn's server, noticing ``should_exit`` within 10 ms instead of 100 ms, to keep tests fast."""

    async def main_loop(self) -> None:
        await self.on_tick(0)  # sets the default headers
        while not self.should_exit:
            await asyncio.sleep(0.01)


@contextlib.contextmanager
def serve(app: Any, graceful: float = 2.0) -> Iterator[str]:
    """Run ``app`` in a real uvicorn server on a free port; yields its base URL, stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=graceful,
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the uvicorn server did not start")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the uvicorn server did not stop"


def closed_port() -> int:
    """A local port where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeOpenAI:
    """A well-behaved OpenAI-compatible upstream that records what it receives.

    Paths are matched by their ending, so the same app serves ``/v1/...`` under any prefix:
    ``.../chat/completions`` (JSON or SSE, with usage), ``.../models``, ``.../embeddings``,
    ``.../gzip`` (a gzip-encoded JSON body) and anything else as an echo of the request, whose
    status is the ``status`` query parameter. ``pause`` is a wait after the first streamed chunk;
    ``fail`` makes every chat completion answer with that status and an OpenAI error body.
    """

    def __init__(self, reply: str = UPSTREAM_REPLY, pause: float = 0.0, fail: int | None = None) -> None:
        self.url = ""  # set by whoever serves the app
        self.reset(reply, pause, fail)
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=methods)])

    def reset(self, reply: str = UPSTREAM_REPLY, pause: float = 0.0, fail: int | None = None) -> None:
        """Forget the requests received and set the behaviour, so one server can serve many tests."""
        self.reply = reply
        self.pause = pause
        self.fail = fail
        self.requests: list[Recorded] = []

    @property
    def chats(self) -> list[Recorded]:
        """The chat-completion requests received."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        recorded = Recorded(
            method=request.method,
            path=request.scope["raw_path"].decode("latin-1"),
            query=request.scope["query_string"].decode("latin-1"),
            headers=[(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers.raw],
            body=body,
        )
        self.requests.append(recorded)
        path = recorded.path
        if path.endswith("/chat/completions") and request.method == "POST":
            return self._chat(recorded)
        if path.endswith("/models"):
            models = [{"id": "gpt-test", "object": "model", "created": 1700000000, "owned_by": "test"}]
            return JSONResponse({"object": "list", "data": models})
        if path.endswith("/embeddings"):
            embedding = {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}
            usage = {"prompt_tokens": 3, "total_tokens": 3}
            return JSONResponse({"object": "list", "data": [embedding], "model": "e", "usage": usage})
        if path.endswith("/gzip"):
            payload = gzip.compress(orjson.dumps({"compressed": True, "items": list(range(200))}))
            headers = {"content-encoding": "gzip"}
            return Response(payload, media_type="application/json", headers=headers)
        echo = {
            "method": recorded.method,
            "path": recorded.path,
            "query": recorded.query,
            "body": body.decode("latin-1"),
        }
        status = int(request.query_params.get("status", "200"))
        headers = {"x-upstream-header": "kept", "x-request-id": "req-echo-1"}
        if "set_cookie" in request.query_params:
            headers["set-cookie"] = request.query_params["set_cookie"] + "; Path=/"
        return Response(orjson.dumps(echo), status, headers=headers, media_type="application/json")

    def _chat(self, recorded: Recorded) -> Response:
        if self.fail is not None:
            return JSONResponse(UPSTREAM_ERROR, self.fail)
        payload = recorded.json()
        model = payload.get("model", "gpt-test")
        headers = {"x-request-id": "req-chat-1"}
        if not payload.get("stream"):
            completion = {
                "id": "chatcmpl-upstream",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.reply, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": UPSTREAM_USAGE,
            }
            return JSONResponse(completion, headers=headers)
        options = payload.get("stream_options") or {}
        events = sse_chunks(self.reply, model, usage=bool(options.get("include_usage")))
        return StreamingResponse(self._paced(events), media_type="text/event-stream", headers=headers)

    async def _paced(self, events: list[bytes]) -> AsyncIterator[bytes]:
        for i, event in enumerate(events):
            yield event
            if i == 1 and self.pause:  # after the first content chunk
                await asyncio.sleep(self.pause)


def sse_chunks(reply: str, model: str = "gpt-test", usage: bool = False) -> list[bytes]:
    """A chat completion streamed as SSE events, one per word, ending with ``[DONE]``."""
    base = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
    }

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**base, "choices": [choice], **extra}) + b"\n\n"

    words = reply.split(" ")
    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    events.append(event({}, "stop"))
    if usage:
        events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": UPSTREAM_USAGE}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


Script = Callable[["RawUpstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    """A hand-written HTTP/1.1 server: each connection reads one request, then runs ``script``.

    ``closed`` is set, and ``closed_after`` holds the seconds since the response started, when the
    script sees its client hang up (EOF) while it waits.
    """

    script: Script
    requests: list[Recorded] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)
    closed_after: float | None = None
    started: float = 0.0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def __enter__(self) -> RawUpstream:
        self._thread.start()
        start = asyncio.start_server(self._connection, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = line.split(" ", 2)
            headers = [
                (k.strip().lower(), v.strip()) for k, v in (h.split(":", 1) for h in lines if ":" in h)
            ]
            length = int(next((v for k, v in headers if k == "content-length"), "0"))
            body = await reader.readexactly(length)
            path, _, query = target.partition("?")
            self.requests.append(Recorded(method, path, query, headers, body))
            self.started = time.monotonic()
            await self.script(self, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the server is stopping
        finally:
            self._tasks.discard(task)
            writer.close()

    async def wait_for_eof(self, reader: asyncio.StreamReader, timeout: float = 30.0) -> bool:
        """Wait until the client hangs up (True) or ``timeout`` passes (False)."""
        with contextlib.suppress(asyncio.TimeoutError):
            while await asyncio.wait_for(reader.read(65536), timeout):
                pass
            self.closed_after = time.monotonic() - self.started
            self.closed.set()
            return True
        return False


def sse_head() -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
    )


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def hang(upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request and never answer."""
    await upstream.wait_for_eof(reader)


async def stall_after_headers(
    upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer with event-stream headers, then send nothing more."""
    writer.write(sse_head())
    await writer.drain()
    await upstream.wait_for_eof(reader)


def cut_sse(events: list[bytes], tail: bytes = b"") -> Script:
    """Stream ``events`` (and ``tail``, a partial event), then close without ending the chunked body."""

    async def script(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(sse_head())
        for event in [*events, tail] if tail else events:
            writer.write(chunk(event))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.close()

    return script


def cut_json(body: bytes, sent: int) -> Script:
    """Announce ``body``'s length, send ``sent`` bytes of it, then close the connection."""

    async def script(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body[:sent])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    return script


def slow_sse(events: list[bytes], pause: float) -> Script:
    """Stream the first event, wait ``pause`` seconds (noticing a hang-up), then finish the stream."""

    async def script(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(sse_head() + chunk(events[0]))
        await writer.drain()
        if await upstream.wait_for_eof(reader, timeout=pause):
            return
        for event in events[1:]:
            writer.write(chunk(event))
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return script


class ProxyServer:
    """The proxy app for ``settings`` in a real uvicorn server, with SDK and HTTP clients for it."""

    def __init__(self, guard: Guard, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings, guard)
        self.url = ""
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ProxyServer:
        self.url = self._stack.enter_context(serve(self.app))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Close the clients, then shut the server down (its lifespan flushes the log); idempotent."""
        self._stack.close()

    def sdk(self, **options: Any) -> openai.OpenAI:
        """The official OpenAI client pointed at the proxy, without retries."""
        client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=10, **options
        )
        self._stack.callback(client.close)
        return client

    def async_sdk(self) -> openai.AsyncOpenAI:
        """The official async OpenAI client pointed at the proxy; close it on its own loop."""
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)

    def http(self) -> httpx.Client:
        """A plain HTTP client for the proxy, for requests the SDK cannot make."""
        client = httpx.Client(base_url=self.url, timeout=10)
        self._stack.callback(client.close)
        return client

    def records(self) -> list[dict[str, Any]]:
        """The interaction log's records so far."""
        path = self.settings.log_path
        assert path is not None
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]

    def record(self, id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The record with ``id``, waiting for the log's writer thread to write it."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records() if r["id"] == id]
            if found:
                assert len(found) == 1, f"{len(found)} records with id {id}"
                return found[0]
            assert time.monotonic() < deadline, f"no interaction record with id {id}"
            time.sleep(0.01)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples matching ``labels``, scraped from ``/metrics``."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )
