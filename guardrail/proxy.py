"""The reverse proxy: guards chat completions and passes everything else through to the upstream.

Clients change only their base URL. ``POST /v1/chat/completions`` (and ``/chat/completions``) is
judged; a blocked request is answered here with the refusal and never reaches the upstream. Every
other method and path goes to the upstream unchanged (query, headers, Authorization, body, status,
streaming). The proxy's own endpoints are ``/metrics`` and ``/healthz``.

Upstream URL: the request path is appended to it, unless the upstream URL already ends with the path's
first segments, so ``--upstream https://api.openai.com/v1`` and ``--upstream https://api.openai.com``
both send ``/v1/models`` to ``https://api.openai.com/v1/models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from guardrail.gate import BodyTooLarge, Decision, Gate, check_declared_length, limited, open_log
from guardrail.guard import Guard
from guardrail.interactions import InteractionLog
from guardrail.metrics import Metrics
from guardrail.protocols.base import BadRequest, ChatProtocol, Conversation
from guardrail.protocols.openai import OpenAIChat, error_body
from guardrail.relay import RelayOutcome, UpstreamRelay, wait_for_disconnect, without_hop_by_hop
from guardrail.settings import Settings
from guardrail.transport import AiohttpTransport

logger = logging.getLogger("guardrail.proxy")

GUARDED_PATHS = ("/v1/chat/completions", "/chat/completions")
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


class Upstream:
    """The one shared way to the upstream: an httpx transport (aiohttp's connection pool) with timeouts
    and connection limits on by default.

    Requests go straight to the transport rather than through an ``httpx.AsyncClient``: a client keeps
    the cookies an upstream sets and sends them with later requests, which in a proxy means one user's
    session cookie going out with another user's request; and its cookie, auth and redirect machinery
    was a quarter of the proxy's event-loop time. Nothing is added to what the client sent.
    """

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.timeout = httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.read_timeout,
            pool=settings.connect_timeout,
        ).as_dict()
        limits = httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
        )
        self.transport = transport if transport is not None else AiohttpTransport(limits=limits)

    def request(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], content: Any
    ) -> httpx.Request:
        """An upstream request carrying the timeouts."""
        return httpx.Request(
            method, url, headers=headers, content=content, extensions={"timeout": self.timeout}
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send; the response's body is streamed."""
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the connections."""
        await self.transport.aclose()


def create_app(
    settings: Settings,
    guard: Guard,
    transport: httpx.AsyncBaseTransport | None = None,
    log: InteractionLog | None = None,
    metrics: Metrics | None = None,
    protocol: ChatProtocol | None = None,
) -> Starlette:
    """The proxy app for ``settings.upstream``; a log is opened from the settings unless given."""
    if settings.upstream is None:
        from guardrail.errors import ConfigError

        raise ConfigError("the proxy needs an upstream URL (--upstream or GUARDRAIL_UPSTREAM)")
    owns_transport, owns_log = transport is None, log is None
    if log is None:
        log = open_log(settings)
    gate = Gate.from_settings(guard, settings, log, metrics)
    proxy = Proxy(settings, gate, Upstream(settings, transport), protocol or OpenAIChat())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if log is not None:
            log.start()
        try:
            yield
        finally:
            # What was passed in belongs to the caller; what was made here is closed here.
            if owns_transport:
                await proxy.upstream.aclose()
            gate.batcher.close()
            if log is not None and owns_log:
                # Flushing may touch the disk: keep it off the loop.
                await asyncio.to_thread(log.close)

    routes = [
        Route("/metrics", proxy.metrics, methods=["GET"]),
        Route("/healthz", proxy.healthz, methods=["GET"]),
        *(Route(path, proxy.chat, methods=["POST"]) for path in GUARDED_PATHS),
        Route("/{path:path}", proxy.passthrough, methods=METHODS),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gate = gate
    app.state.proxy = proxy
    return app


class Proxy:
    """The proxy's endpoints, sharing one upstream and one gate."""

    def __init__(self, settings: Settings, gate: Gate, upstream: Upstream, protocol: ChatProtocol):
        assert settings.upstream is not None
        self.settings = settings
        self.gate = gate
        self.upstream = upstream
        self.protocol = protocol
        url = httpx.URL(settings.upstream)
        self.origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        self.prefix = url.raw_path.decode("ascii").split("?")[0].rstrip("/")

    def target(self, raw_path: bytes, query: bytes) -> str:
        """The upstream URL for a request path: the upstream's path, then the request's, overlap once."""
        path = raw_path.decode("latin-1")
        prefix = self.prefix.split("/")
        segments = path.split("/")
        # The longest tail of the upstream's path that the request path starts with ("/api/v1" and
        # "/v1/models" overlap in "v1") is written once.
        for size in range(len(prefix) - 1, 0, -1):
            if prefix[-size:] == segments[1 : size + 1]:
                path = "/".join(prefix[:-size] + segments[1:])
                break
        else:
            path = self.prefix + path
        return f"{self.origin}{path}" + (f"?{query.decode('latin-1')}" if query else "")

    async def metrics(self, request: Request) -> Response:
        """Prometheus text format."""
        log = self.gate.log
        if log is not None:
            self.gate.metrics.log_depth.set(log.depth)
        return Response(generate_latest(self.gate.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        """The process is alive and serving."""
        return JSONResponse({"status": "ok", "scenario": self.gate.scenario})

    async def chat(self, request: Request) -> Response:
        """A guarded chat completion: judged, then refused here or relayed upstream."""
        limit = self.settings.max_body_bytes
        try:
            check_declared_length(request.headers.raw, limit)
            body = b"".join([chunk async for chunk in limited(request.stream(), limit)])
            conversation = self.protocol.parse(body)
        except BodyTooLarge as exc:
            return self._too_large(exc)
        except BadRequest as exc:
            self.gate.metrics.rejected.labels("malformed").inc()
            return _error(400, str(exc), "invalid_request_error")
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            decision = await self.gate.decide(conversation)
        except Exception as exc:
            # A broken guard fails closed with a clear error, never a traceback, and is logged in full.
            logger.exception("the guard failed on a request")
            return _error(500, f"guardrail could not judge the request: {type(exc).__name__}", "server_error")
        path = request.url.path
        if decision.blocked:
            self.gate.record(decision, conversation, path, reply=self.gate.refusal)
            return self._refusal(decision, conversation)
        return await self._forward(request, body, decision, conversation)

    def _refusal(self, decision: Decision, conversation: Conversation) -> Response:
        headers = dict((k.decode(), v.decode()) for k, v in decision.headers())
        refusal = self.gate.refusal
        if conversation.stream:
            chunks = self.protocol.refusal_stream(conversation, refusal, decision.id)
            response: Response = StreamingResponse(
                _iterate(chunks), media_type="text/event-stream", headers=headers
            )
            response.headers["cache-control"] = "no-cache"
            return response
        body = self.protocol.refusal(conversation, refusal, decision.id)
        return Response(body, media_type="application/json", headers=headers)

    async def _forward(
        self, request: Request, body: bytes, decision: Decision, conversation: Conversation
    ) -> Response:
        headers = _request_headers(request.headers.raw, guarded=True)
        upstream_request = self.upstream.request(
            request.method,
            self.target(request.scope["raw_path"], request.scope["query_string"]),
            headers,
            body,
        )
        sent = time.perf_counter()
        path = request.url.path
        try:
            upstream = await _send_unless_client_leaves(self.upstream, upstream_request, request.receive)
        except ClientDisconnect:
            # A non-streamed completion sends no headers until it is done: without this, the
            # upstream would go on generating for a client that gave up.
            self.gate.record(decision, conversation, path, error="the client disconnected")
            return Response(status_code=499)
        except httpx.HTTPError as exc:
            response = self._upstream_failed(exc, decision.headers())
            self.gate.record(
                decision, conversation, path, status=response.status_code, error=str(exc) or None
            )
            return response
        first_byte = time.perf_counter() - sent
        self.gate.metrics.upstream_seconds.observe(first_byte)
        # Read the reply by what came back: an upstream error to a streamed request is plain JSON.
        reader = self.protocol.reader(
            upstream.headers.get("content-type", "").startswith("text/event-stream")
        )

        def finished(outcome: RelayOutcome) -> None:
            if outcome.error:
                self.gate.metrics.upstream_errors.labels("broken").inc()
            error = outcome.error or ("the client disconnected" if outcome.disconnected else None)
            self.gate.record(
                decision,
                conversation,
                path,
                status=outcome.status,
                usage=reader.usage,
                reply=reader.text,
                upstream_seconds=first_byte,
                error=error,
            )

        return UpstreamRelay(upstream, decision.headers(), reader, finished)

    async def passthrough(self, request: Request) -> Response:
        """Any other request, sent upstream as it came and relayed back as it comes."""
        if not _normal(request.url.path):
            # "/v1/./chat/completions" would reach the upstream's chat endpoint unjudged.
            self.gate.metrics.rejected.labels("malformed").inc()
            return _error(400, "the path has empty, '.' or '..' segments", "invalid_request_error")
        limit = self.settings.max_body_bytes
        try:
            check_declared_length(request.headers.raw, limit)
        except BodyTooLarge as exc:
            return self._too_large(exc)
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        upstream_request = self.upstream.request(
            request.method,
            self.target(request.scope["raw_path"], request.scope["query_string"]),
            _request_headers(request.headers.raw, guarded=False),
            limited(request.stream(), limit) if has_body else None,
        )
        try:
            upstream = await self.upstream.send(upstream_request)
        except ClientDisconnect:
            return Response(status_code=499)
        except BodyTooLarge as exc:
            return self._too_large(exc)
        except httpx.HTTPError as exc:
            return self._upstream_failed(exc, [])
        return UpstreamRelay(upstream)

    def _too_large(self, exc: BodyTooLarge) -> Response:
        self.gate.metrics.rejected.labels("too_large").inc()
        return _error(413, str(exc), "invalid_request_error")

    def _upstream_failed(self, exc: httpx.HTTPError, headers: list[tuple[bytes, bytes]]) -> Response:
        timed_out = isinstance(exc, httpx.TimeoutException)
        kind = "timeout" if timed_out else "unreachable"
        self.gate.metrics.upstream_errors.labels(kind).inc()
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        logger.warning("upstream %s: %s", kind, detail)
        if timed_out:
            status, message = 504, f"the upstream did not answer in time ({detail})"
        else:
            status, message = 502, f"the upstream cannot be reached ({detail})"
        response = Response(
            error_body(message, "upstream_error", status), status, media_type="application/json"
        )
        response.raw_headers.extend(headers)
        return response


def _normal(path: str) -> bool:
    segments = path.split("/")[1:-1]  # a trailing slash is fine
    return not any(segment in ("", ".", "..") for segment in segments) and not path.endswith(("/.", "/.."))


async def _send_unless_client_leaves(
    upstream: Upstream, request: httpx.Request, receive: Any
) -> httpx.Response:
    """Send upstream, cancelling the request if the client disconnects before the response starts."""
    sending = asyncio.ensure_future(upstream.send(request))
    watching = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if sending.done():
        return sending.result()
    sending.cancel()
    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
        response = await sending
        await response.aclose()
    raise ClientDisconnect


def _request_headers(raw: Sequence[tuple[bytes, bytes]], guarded: bool) -> list[tuple[bytes, bytes]]:
    """The client's headers minus hop-by-hop ones; Authorization and the rest go on as they came."""
    drop = {"host"}
    if guarded:
        # The body is re-sent from memory (httpx sets its length), and the reply is read for the log,
        # so it is asked for uncompressed.
        drop |= {"content-length", "accept-encoding"}
    kept = [(k, v) for k, v in without_hop_by_hop(raw) if k.decode("latin-1").lower() not in drop]
    if guarded:
        kept.append((b"accept-encoding", b"identity"))
    return kept


def _error(status: int, message: str, type: str) -> Response:
    return Response(error_body(message, type, status), status, media_type="application/json")


async def _iterate(chunks: Any) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
