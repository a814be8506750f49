"""Pure ASGI middleware: the same guard in front of an existing chatbot app instead of an upstream.

    app.add_middleware(GuardrailMiddleware, scenario="scenarios/real_estate.md")

Only ``POST`` requests to the guarded paths are judged (``paths`` maps each path to its wire format,
or lists paths that all speak ``protocol``); every other request, websockets and lifespan
pass through untouched. A blocked request is answered in the app's own format (an OpenAI
``chat.completion`` by default, or the reply shape of ``JSONFields``) and never reaches the app. A
passed one reaches the app with its body replayed (in the OpenAI format, with layer 2's instruction
added to its system message), and its reply goes back unbuffered, with the ``x-guardrail-*`` headers
added, while a copy of the text is kept for the interaction log.
"""

from __future__ import annotations

import asyncio
import atexit
import time
import weakref
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardrail.asgi import ClientLeft, guard_failed, read_body, refuse, respond, route_path
from guardrail.errors import ConfigError
from guardrail.gate import BodyTooLarge, Decision, Gate, open_log
from guardrail.guard import Guard
from guardrail.interactions import InteractionLog
from guardrail.metrics import Metrics
from guardrail.protocols.base import BadRequest, ChatProtocol, Conversation, ReplyReader
from guardrail.protocols.openai import OpenAIChat, error_body
from guardrail.settings import Settings

DEFAULT_PATHS = ("/v1/chat/completions", "/chat/completions")


class GuardrailMiddleware:
    """Guards an ASGI app's chat endpoints against off-topic messages."""

    def __init__(
        self,
        app: ASGIApp,
        scenario: str | Path | None = None,
        *,
        guard: Guard | None = None,
        paths: Sequence[str] | Mapping[str, ChatProtocol] = DEFAULT_PATHS,
        protocol: ChatProtocol | None = None,
        settings: Settings | None = None,
        log: InteractionLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """Load the guard once (from ``scenario`` or ``settings.scenario``) unless one is given."""
        self.app = app
        settings = settings if settings is not None else Settings.load(scenario=scenario)
        if guard is None:
            if scenario is None and settings.scenario is None:
                raise ConfigError("GuardrailMiddleware needs a scenario document or a guard")
            guard = Guard.from_settings(settings, scenario)
        # A log passed in belongs to the caller; one made from the settings is opened at each start-up
        # and flushed at each shutdown, so the app can be served again (tests, reloads).
        self._settings = settings
        self._owns_log = log is None and settings.log_path is not None
        protocol = protocol if protocol is not None else OpenAIChat()
        if isinstance(paths, str):
            raise TypeError("paths must be a list of paths or a mapping of path to protocol, not one string")
        self.paths: dict[str, ChatProtocol] = (
            dict(paths) if isinstance(paths, Mapping) else dict.fromkeys(paths, protocol)
        )
        self.max_body_bytes = settings.max_body_bytes
        self.gate = Gate.from_settings(guard, settings, log, metrics)
        self._exit_hook = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] != "http" or scope["method"] != "POST" or route_path(scope) not in self.paths:
            await self.app(scope, receive, send)
            return
        await _GuardedRequest(self, scope, receive, send).run()

    def open_log(self) -> InteractionLog | None:
        """The log in use, opening a new one from the settings when the last one was closed."""
        log = self.gate.log
        if self._owns_log and (log is None or log.closed):
            log = self.gate.log = open_log(self._settings)
            if not self._exit_hook:
                atexit.register(_close_at_exit, weakref.ref(self))
                self._exit_hook = True
        if log is not None:
            log.start()
        return log

    def _lifespan_send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.open_log()
            if message["type"] == "lifespan.shutdown.complete":
                self.gate.flush()
            log = self.gate.log
            if self._owns_log and log is not None and message["type"] == "lifespan.shutdown.complete":
                # Flush the interaction log before the server exits; the disk is touched off the loop.
                await asyncio.to_thread(log.close)
            await send(message)

        return lifespan_send


def _close_at_exit(ref: weakref.ReferenceType[GuardrailMiddleware]) -> None:
    """Write the records still pending or queued when the interpreter exits. An app that gets no
    lifespan events (a mounted app, or a server run with them off) never shuts its log down, and the
    writer is a daemon thread: without this, the last 50 ms or so of records would be lost."""
    middleware = ref()
    if middleware is None:
        return
    middleware.gate.flush()
    if middleware.gate.log is not None:
        middleware.gate.log.close(timeout=5.0)


class _GuardedRequest:
    """Per-request state: the body, the decision, and the reply as it goes by."""

    def __init__(self, middleware: GuardrailMiddleware, scope: Scope, receive: Receive, send: Send):
        self.middleware = middleware
        self.gate = middleware.gate
        self.scope = scope
        self.receive = receive
        self.send = send
        self.path = route_path(scope)
        self.protocol = middleware.paths[self.path]
        self.status: int | None = None
        self.first_byte: float | None = None
        self.reader: ReplyReader | None = None

    async def run(self) -> None:
        gate = self.gate
        try:
            body = await read_body(self.scope, self.receive, self.middleware.max_body_bytes)
            conversation = self.protocol.parse(body)
        except ClientLeft:
            return
        except BodyTooLarge as exc:
            gate.metrics.rejected.labels("too_large").inc()
            await respond(self.send, 413, error_body(str(exc), "invalid_request_error", 413))
            return
        except BadRequest as exc:
            gate.metrics.rejected.labels("malformed").inc()
            await respond(self.send, 400, error_body(str(exc), "invalid_request_error", 400))
            return
        self.middleware.open_log()  # cheap when open; an app served without lifespan events still logs
        try:
            decision = await gate.decide(conversation)
        except Exception as exc:
            await guard_failed(self.send, exc)
            return
        if decision.blocked:
            gate.record(decision, conversation, self.path, reply=gate.refusal)
            await refuse(self.send, self.protocol, conversation, decision, gate.refusal)
            return
        sent = gate.instruct(decision, conversation, self.protocol, body)
        await self._call_app(sent, decision, conversation, instructed=sent is not body)

    async def _call_app(
        self, body: bytes, decision: Decision, conversation: Conversation, instructed: bool
    ) -> None:
        scope = self.scope
        if instructed:
            # The app may trust Content-Length: it must be the length of the body it is given.
            scope = {**scope, "headers": _with_length(scope["headers"], len(body))}
        replayed = False
        inflate: Any = None

        async def receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await self.receive()

        async def send(message: Message) -> None:
            nonlocal inflate
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.first_byte = time.perf_counter() - started
                headers = list(message.get("headers", []))
                content_type = dict(headers).get(b"content-type", b"")
                self.reader = self.protocol.reader(content_type.startswith(b"text/event-stream"))
                # An app that compresses its replies (GZipMiddleware inside the guard): read a copy.
                encoding = dict(headers).get(b"content-encoding", b"").strip().lower()
                if encoding in (b"gzip", b"deflate"):
                    inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, auto-detected
                message = {**message, "headers": headers + decision.headers()}
            elif message["type"] == "http.response.body" and self.reader is not None:
                chunk = message.get("body", b"")
                if inflate is not None:
                    try:
                        chunk = inflate.decompress(chunk)
                    except zlib.error:
                        chunk = b""
                self.reader.feed(chunk)
            await self.send(message)

        started = time.perf_counter()
        error: str | None = None
        try:
            await self.middleware.app(scope, receive, send)
        except Exception as exc:
            error = f"the app raised {type(exc).__name__}: {exc}"
            raise
        finally:
            reader = self.reader
            if reader is not None:
                reader.close()
            usage: dict[str, Any] | None = reader.usage if reader else None
            self.gate.record(
                decision,
                conversation,
                self.path,
                status=self.status,
                usage=usage,
                reply=reader.text if reader else None,
                upstream_seconds=self.first_byte,
                error=error,
                instructed=instructed,
            )


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    """Headers with Content-Length set to ``length``; a chunked body (no Content-Length) stays so."""
    value = b"%d" % length
    return [(k, value) if k.lower() == b"content-length" else (k, v) for k, v in headers]
