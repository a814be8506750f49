"""Small pure-ASGI pieces shared by the proxy and the middleware: reading a guarded request's body,
answering it here, and noticing a client that leaves."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from guardrail.gate import BodyTooLarge, Decision, check_declared_length
from guardrail.protocols.base import ChatProtocol, Conversation
from guardrail.protocols.openai import error_body

logger = logging.getLogger("guardrail")


class ClientLeft(Exception):
    """The client disconnected before its request was answered."""


def route_path(scope: Scope) -> str:
    """The request path inside the app: without the prefix of a mount or a server's --root-path."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        return path[len(root.rstrip("/")) :] or "/"
    return path


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body; ``BodyTooLarge`` past ``limit`` bytes, ``ClientLeft`` if the client goes."""
    check_declared_length(scope["headers"], limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def respond(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    """A whole response in two messages."""
    raw = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": raw + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def error_response(status: int, message: str, type: str, headers: dict[str, str] | None = None) -> Response:
    """An OpenAI-style error as a Starlette response, for the endpoints routed through Starlette."""
    return Response(error_body(message, type, status), status, headers, media_type="application/json")


async def guard_failed(send: Send, exc: Exception) -> None:
    """A broken guard fails closed: logged in full here, a clear 500 to the client, never a traceback."""
    logger.error("the guard failed on a request", exc_info=exc)
    message = f"guardrail could not judge the request: {type(exc).__name__}"
    await respond(send, 500, error_body(message, "server_error", 500))


async def refuse(
    send: Send, protocol: ChatProtocol, conversation: Conversation, decision: Decision, refusal: str
) -> None:
    """Answer a blocked request with the refusal, in the protocol's format, streamed if it asked."""
    if not conversation.stream:
        await respond(send, 200, protocol.refusal(conversation, refusal, decision.id), decision.headers())
        return
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers + decision.headers()})
    for chunk in protocol.refusal_stream(conversation, refusal, decision.id):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (once its body has been read, that is all receive says)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientWatch:
    """Cancels the current task when the client disconnects, so whatever it awaits for that client
    (an upstream response, the next chunk of a stream) stops at once.

    The handler catches the ``CancelledError`` and, when ``left`` is set, treats it as the client
    having gone (``settle`` takes the cancellation back, so the rest of the handler can still await its
    clean-up). A cancellation with ``left`` unset (the server shutting down) is not the watch's, and
    goes on.

    The watching task starts ``delay`` seconds after the watch, not at once. A task started the moment
    a verdict arrives costs the event loop an extra turn, and each turn lets go of the GIL: the encoder
    worker that has just handed the verdict over takes it, and the request waits for the worker's next
    stretch of Python (once per request, 0.1-0.5 ms with one client). Most replies from a fast upstream
    are over before the delay; a client that leaves within it is noticed when it ends, so an upstream
    request outlives its client by at most ``delay``.
    """

    def __init__(self, receive: Receive, delay: float = 0.02) -> None:
        self.left = False
        self._stopped = False
        self._receive = receive
        self._task = asyncio.current_task()
        self._watch: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        if delay > 0:
            self._timer = asyncio.get_running_loop().call_later(delay, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._timer = None
        if not self._stopped:
            self._watch = asyncio.ensure_future(wait_for_disconnect(self._receive))
            self._watch.add_done_callback(self._done)

    def _done(self, watch: asyncio.Future[Any]) -> None:
        if self._stopped or watch.cancelled() or watch.exception() is not None:
            return
        self.left = True
        if self._task is not None:
            self._task.cancel()

    def settle(self) -> None:
        """Take back the cancellation the client's leaving caused."""
        uncancel = getattr(self._task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()

    def stop(self) -> None:
        """Stop watching."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        if self._watch is not None:
            self._watch.cancel()
