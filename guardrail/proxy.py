"""The reverse proxy: guards chat completions and passes everything else through to the upstream.

Clients change only their base URL. ``POST /v1/chat/completions`` (and ``/chat/completions``) is
judged; a blocked request is answered here with the refusal and never reaches the upstream, and a
passed one goes on with layer 2's instruction added to its system message (unless the ``instruction``
setting is off, or in shadow mode: see ``Gate.instruct``). Every other method and path goes to the
upstream unchanged (query, headers, Authorization, body, status, streaming). The proxy's own endpoints
are ``/metrics``, ``/healthz``, ``/readyz`` and the admin endpoints under ``/guardrail/`` (see
``admin.py``).

``/healthz``: the process is alive. ``/readyz``: the guard is loaded (a configured classifier that does
not exist yet is fine: layer 1 decides) and the upstream accepts a TCP connection where the pool connects
(its HTTP(S)_PROXY, if one applies); that check (``upstream.UpstreamCheck``) is shared by concurrent
probes and kept ``READY_TTL`` s.

Upstream URL: the request path is appended to it, unless the upstream URL already ends with the path's
first segments, so ``--upstream https://api.openai.com/v1`` and ``--upstream https://api.openai.com``
both send ``/v1/models`` to ``https://api.openai.com/v1/models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from guardrail.admin import Reloader, admin_routes, watching
from guardrail.asgi import (
    ClientLeft,
    ClientWatch,
    error_response,
    guard_failed,
    read_body,
    refuse,
    respond,
    route_path,
)
from guardrail.errors import UpstreamError
from guardrail.gate import (
    BodyStalled,
    BodyTooLarge,
    Decision,
    Gate,
    check_declared_length,
    limited,
    open_log,
    paced,
)
from guardrail.guard import Guard
from guardrail.interactions import InteractionLog
from guardrail.metrics import Metrics, multiprocess
from guardrail.protocols.base import BadRequest, ChatProtocol, Conversation, ReplyReader
from guardrail.protocols.openai import OpenAIChat, error_body
from guardrail.relay import RelayOutcome, UpstreamRelay, relay, without_hop_by_hop
from guardrail.settings import Settings
from guardrail.upstream import READY_TIMEOUT, Upstream, UpstreamCheck

logger = logging.getLogger("guardrail.proxy")

GUARDED_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
DEPTH_INTERVAL = 1.0  # seconds between log queue depth samples, with several workers


def create_app(
    settings: Settings,
    guard: Guard,
    upstream: Upstream | None = None,
    log: InteractionLog | None = None,
    metrics: Metrics | None = None,
    protocol: ChatProtocol | None = None,
) -> Starlette:
    """The proxy app for ``settings.upstream``; a log is opened from the settings unless given."""
    if settings.upstream is None:
        from guardrail.errors import ConfigError

        raise ConfigError("the proxy needs an upstream URL (--upstream or GUARDRAIL_UPSTREAM)")
    owns_upstream, owns_log = upstream is None, log is None
    if upstream is None:
        upstream = Upstream(
            settings.upstream,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            max_connections=settings.max_connections,
        )
    if log is None:
        log = open_log(settings)
    gate = Gate.from_settings(guard, settings, log, metrics)
    proxy = Proxy(settings, gate, upstream, protocol or OpenAIChat())
    reloader = Reloader(guard, settings)  # one for the watcher and POST /guardrail/reload

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if log is not None:
            log.start()
        sampling = asyncio.create_task(_sample_depth(gate)) if multiprocess() and log is not None else None
        try:
            # The classifier watcher and SIGHUP (see guardrail/admin.py), for the app's lifetime.
            async with watching(reloader):
                yield
        finally:
            if sampling is not None:
                sampling.cancel()
                await asyncio.gather(sampling, return_exceptions=True)
            # What was passed in belongs to the caller; what was made here is closed here.
            if owns_upstream:
                await proxy.upstream.aclose()
            gate.batcher.close()
            gate.flush()
            if log is not None and owns_log:
                # Flushing may touch the disk: keep it off the loop.
                await asyncio.to_thread(log.close)

    routes = [
        Route("/metrics", proxy.metrics, methods=["GET"]),
        Route("/healthz", proxy.healthz, methods=["GET"]),
        Route("/readyz", proxy.readyz, methods=["GET"]),
        # Before the catch-all, so nothing under /guardrail/ is ever sent upstream.
        *admin_routes(gate, reloader),
        Route("/{path:path}", proxy.passthrough, methods=METHODS),
    ]
    app = _ProxyApp(routes=routes, lifespan=lifespan)
    app.state.gate = gate
    app.state.proxy = proxy
    app.chat = proxy.chat
    return app


async def _sample_depth(gate: Gate) -> None:
    """Keep this worker's share of ``guardrail_log_queue_depth`` fresh: a scrape reaches one worker, and
    adds up the values every worker last set."""
    while gate.log is not None:
        gate.metrics.log_depth.set(gate.log.depth)
        await asyncio.sleep(DEPTH_INTERVAL)


class _ProxyApp(Starlette):
    """Starlette for the proxy's own endpoints and the passthrough; guarded chat completions go
    straight to ``Proxy.chat``, a plain ASGI handler: the path every judged request takes, kept free
    of routing, request objects and exception middleware it does not use."""

    chat: Callable[[Scope, Receive, Send], Awaitable[None]]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and _guarded(route_path(scope)):
            await self.chat(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


class Proxy:
    """The proxy's endpoints, sharing one upstream and one gate."""

    def __init__(self, settings: Settings, gate: Gate, upstream: Upstream, protocol: ChatProtocol):
        self.settings = settings
        self.gate = gate
        self.upstream = upstream
        self.protocol = protocol
        self.upstream_check = UpstreamCheck.of(upstream, min(READY_TIMEOUT, settings.connect_timeout))

    async def metrics(self, request: Request) -> Response:
        """Prometheus text format."""
        self.gate.flush()  # the requests finished a moment ago count too
        return Response(self.gate.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        """The process is alive and serving."""
        return JSONResponse({"status": "ok", "scenario": self.gate.scenario})

    async def readyz(self, request: Request) -> Response:
        """Ready to serve: the guard is loaded and the upstream accepts connections; else 503."""
        try:
            problem = await self.upstream_check.problem()
        except Exception as exc:  # a probe gets an answer, never a traceback
            logger.exception("the readiness check failed")
            problem = f"the readiness check failed: {type(exc).__name__}"
        if problem is not None:
            headers = {"retry-after": str(round(self.upstream_check.ttl))}
            return error_response(503, f"not ready: {problem}", "upstream_error", headers)
        classifier = self.gate.guard.classifier
        name = classifier.name if classifier is not None else None
        ready = {"status": "ready", "scenario": self.gate.scenario, "classifier": name}
        return JSONResponse({**ready, "upstream": self.upstream_check.address})

    async def chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A guarded chat completion (ASGI): judged, then refused here or relayed upstream."""
        gate = self.gate
        try:
            body = await read_body(scope, receive, self.settings.max_body_bytes)
            conversation = self.protocol.parse(body)
        except ClientLeft:
            return  # nobody to answer
        except BodyTooLarge as exc:
            gate.metrics.rejected.labels("too_large").inc()
            await respond(send, 413, error_body(str(exc), "invalid_request_error", 413))
            return
        except BadRequest as exc:
            gate.metrics.rejected.labels("malformed").inc()
            await respond(send, 400, error_body(str(exc), "invalid_request_error", 400))
            return
        try:
            deciding = gate.start(conversation)
            # While the encoder runs, the upstream request is made ready, to go the moment it passes.
            url = self.upstream.target(scope["raw_path"], scope["query_string"])
            headers = _request_headers(scope["headers"], guarded=True)
            decision = await deciding
        except Exception as exc:
            await guard_failed(send, exc)
            return
        path = route_path(scope)
        if decision.blocked:
            gate.record(decision, conversation, path, reply=gate.refusal)
            await refuse(send, self.protocol, conversation, decision, gate.refusal)
            return
        # The client's Content-Length is already dropped (see _request_headers): aiohttp sets the
        # length of what is sent, instructed or not.
        sent = gate.instruct(decision, conversation, self.protocol, body)
        await self._forward(url, headers, sent, decision, conversation, path, receive, send, sent is not body)

    async def _forward(
        self,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        decision: Decision,
        conversation: Conversation,
        path: str,
        receive: Receive,
        send: Send,
        instructed: bool = False,
    ) -> None:
        # A non-streamed completion sends nothing until it is done: without the watch, the upstream
        # would go on generating for a client that gave up; with it, the request is closed at once.
        watch = ClientWatch(receive)
        sent = time.perf_counter()
        upstream = None
        outcome: RelayOutcome | None = None
        reader = None
        first_byte: float | None = None
        error: str | None = None
        try:
            upstream = await self.upstream.send("POST", url, headers, body)
            first_byte = time.perf_counter() - sent
            self.gate.metrics.upstream_seconds.observe(first_byte)
            # Read the reply by what came back: an upstream error to a streamed request is plain JSON.
            reader = self.protocol.reader(upstream.content_type.startswith("text/event-stream"))
            outcome = RelayOutcome(upstream.status)
            await relay(upstream, send, outcome, reader, decision.headers())
            if outcome.error:
                self.gate.metrics.upstream_errors.labels("broken").inc()
                error = outcome.error
        except UpstreamError as exc:
            response = self._upstream_failed(exc)
            outcome = RelayOutcome(exc.status)
            error = exc.detail
            await respond(send, exc.status, response, decision.headers())
        except asyncio.CancelledError:
            if not watch.left:
                raise
            watch.settle()
            error = _left(reader)
        except OSError:
            # The client's socket failed while sending (ASGI 2.4 servers raise it): same as leaving.
            error = _left(reader)
        finally:
            watch.stop()
            if upstream is not None:
                upstream.close()
            if reader is not None:
                reader.close()
            self.gate.record(
                decision,
                conversation,
                path,
                status=outcome.status if outcome is not None else None,
                usage=reader.usage if reader is not None else None,
                reply=reader.text if reader is not None else None,
                upstream_seconds=first_byte,
                error=error,
                instructed=instructed,
            )

    async def passthrough(self, request: Request) -> Response:
        """Any other request, sent upstream as it came and relayed back as it comes."""
        if not _normal(request.url.path):
            # "/v1/./chat/completions" would reach the upstream's chat endpoint unjudged.
            self.gate.metrics.rejected.labels("malformed").inc()
            return error_response(400, "the path has empty, '.' or '..' segments", "invalid_request_error")
        limit = self.settings.max_body_bytes
        try:
            check_declared_length(request.headers.raw, limit)
        except BodyTooLarge as exc:
            return self._too_large(exc)
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        try:
            upstream = await self.upstream.send(
                request.method,
                self.upstream.target(request.scope["raw_path"], request.scope["query_string"]),
                _request_headers(request.headers.raw, guarded=False),
                limited(paced(request.stream(), self.settings.read_timeout), limit) if has_body else None,
            )
        except ClientDisconnect:
            return Response(status_code=499)
        except BodyTooLarge as exc:
            return self._too_large(exc)
        except BodyStalled as exc:
            self.gate.metrics.rejected.labels("stalled").inc()
            return error_response(408, str(exc), "invalid_request_error", {"connection": "close"})
        except UpstreamError as exc:
            return Response(self._upstream_failed(exc), exc.status, media_type="application/json")
        return UpstreamRelay(upstream, self.gate.metrics.upstream_errors.labels("broken").inc)

    def _too_large(self, exc: BodyTooLarge) -> Response:
        self.gate.metrics.rejected.labels("too_large").inc()
        return error_response(413, str(exc), "invalid_request_error")

    def _upstream_failed(self, exc: UpstreamError) -> bytes:
        """Count and log an upstream that failed before answering; the OpenAI-style error body."""
        self.gate.metrics.upstream_errors.labels(exc.kind).inc()
        logger.warning("upstream %s: %s", exc.kind, exc.detail)
        if exc.kind == "timeout":
            message = f"the upstream did not answer in time ({exc.detail})"
        elif exc.kind == "broken":
            message = f"the upstream's response was broken ({exc.detail})"
        else:
            message = f"the upstream cannot be reached ({exc.detail})"
        return error_body(message, "upstream_error", exc.status)


def _guarded(path: str) -> bool:
    """A chat completions path, also as upstream routers may read it: in another case, with a
    trailing slash or with ``;parameters`` in a segment. Judged, they go upstream as they came;
    passed through, they could reach the chat endpoint unjudged."""
    if path in GUARDED_PATHS:
        return True
    loose = "/".join(segment.split(";", 1)[0] for segment in path.lower().split("/")).rstrip("/")
    return loose in GUARDED_PATHS


def _normal(path: str) -> bool:
    segments = path.split("/")[1:-1]  # a trailing slash is fine
    return not any(segment in ("", ".", "..") for segment in segments) and not path.endswith(("/.", "/.."))


def _left(reader: ReplyReader | None) -> str | None:
    """The error to record for a client that went away during the reply: none once the stream's
    ``[DONE]`` was relayed (the openai SDK closes the connection as soon as it has read it, often
    before the upstream's last bytes arrive)."""
    return None if getattr(reader, "done", False) else "the client disconnected"


def _request_headers(raw: Sequence[tuple[bytes, bytes]], guarded: bool) -> list[tuple[bytes, bytes]]:
    """The client's headers minus hop-by-hop ones; Authorization and the rest go on as they came.

    ``Expect`` stays here too: the server in front answered it (uvicorn sends 100 Continue when the
    body is read), and the body goes upstream at once. Forwarded, aiohttp held the body until the
    upstream sent 100, which an upstream need not do (RFC 9110, 10.1.1): both waited for good."""
    drop = {"host", "expect"}
    if guarded:
        # The body is re-sent from memory (aiohttp sets its length), and the reply is read for the log,
        # so it is asked for uncompressed.
        drop |= {"content-length", "accept-encoding"}
    kept = [(k, v) for k, v in without_hop_by_hop(raw) if k.decode("latin-1").lower() not in drop]
    if guarded:
        kept.append((b"accept-encoding", b"identity"))
    return kept
