"""Relaying an upstream response to the client, unbuffered, and what to do when either side fails.

Each chunk is sent on as it arrives. The relay watches the client's connection at the same time: a
client that goes away cancels the relay, which closes the upstream request, so an abandoned stream
stops costing tokens. When the upstream breaks mid-response after the status line has gone out, the
status can no longer change: an event stream gets a final OpenAI-style ``error`` event (which the SDKs
raise as an error), any other body is cut short so the client sees an incomplete response rather than a
silently truncated one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from guardrail.asgi import ClientWatch
from guardrail.errors import UpstreamError
from guardrail.protocols.base import ReplyReader
from guardrail.protocols.openai import error_body
from guardrail.upstream import UpstreamResponse

logger = logging.getLogger("guardrail.proxy")

# Connection-level headers are for one hop only (RFC 9110, section 7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def without_hop_by_hop(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers minus the hop-by-hop ones, including those the Connection header names, in order."""
    hop = HOP_BY_HOP | {
        name.strip().lower()
        for key, value in raw
        if key.lower() == b"connection"
        for name in value.decode("latin-1").split(",")
        if name.strip()
    }
    return [(k, v) for k, v in raw if k.decode("latin-1").lower() not in hop]


# The server that sends the response on writes these itself (uvicorn does, as do hypercorn and
# daphne): relayed too, they would appear twice. nginx hides them from proxied responses too.
SERVERS_OWN = frozenset({b"date", b"server"})


def response_headers(upstream: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers, lowercased, in order, minus hop-by-hop ones and the
    ``SERVERS_OWN``."""
    # A 304's Content-Length is the size of what the client already has (RFC 9110, 8.6), not of a
    # body: the server in front would wait for those bytes, fail the response and drop the connection.
    drop = SERVERS_OWN | {b"content-length"} if upstream.status == 304 else SERVERS_OWN
    kept = []
    for key, value in without_hop_by_hop(upstream.headers):
        key = key.lower()
        if key not in drop:
            kept.append((key, value))
    return kept


@dataclass
class RelayOutcome:
    """How a relayed response ended."""

    status: int
    complete: bool = False  # the whole body reached the client
    disconnected: bool = False  # the client went away first
    error: str | None = None  # the upstream broke mid-response


async def relay(
    upstream: UpstreamResponse,
    send: Send,
    outcome: RelayOutcome,
    reader: ReplyReader | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send the upstream's response on as it arrives, recording how it ended in ``outcome``.

    An event stream is passed on in whole events: a partial event is held until its blank line
    arrives (never delaying a complete one), so a break never leaves half an event in front of the
    error event. The caller closes ``upstream``.
    """
    headers = response_headers(upstream)
    if extra_headers:
        # Ours replace any of the same name from the upstream (another guard in front of it, say):
        # two verdicts would read as one "spoofed, passed".
        names = {name for name, _ in extra_headers}
        headers = [header for header in headers if header[0] not in names] + extra_headers
    sse = upstream.content_type.startswith("text/event-stream")
    await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
    held = b""
    ended = False
    try:
        async for chunk in upstream.chunks():
            if reader is not None:
                reader.feed(chunk)
            if sse:
                chunk, held = _complete_events(held + chunk)
                if not chunk:
                    continue
            # The body's last bytes end the response in the same message: one send fewer for the
            # usual whole-JSON reply. (The loop then ends by itself: chunks() stops at the end.)
            ended = not held and upstream.at_eof()
            await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
    except UpstreamError as exc:
        outcome.error = f"the upstream broke off mid-response: {exc.detail}"
        logger.warning("%s", outcome.error)
        if not sse:
            # Returning without the final body message makes the server close the connection,
            # so the client sees the response is incomplete.
            return
        body = error_body(outcome.error, "upstream_error", 502)
        await send({"type": "http.response.body", "body": b"data: " + body + b"\n\n", "more_body": True})
        held = b""
    if not ended:
        await send({"type": "http.response.body", "body": held, "more_body": False})
    outcome.complete = outcome.error is None


class UpstreamRelay(Response):
    """An ASGI response that streams an open upstream response to the client, and closes the
    upstream request if the client goes away first."""

    def __init__(self, upstream: UpstreamResponse, broke: Callable[[], object] | None = None) -> None:
        self.upstream = upstream
        self.status_code = upstream.status
        self.background = None
        self.broke = broke  # called when the upstream breaks off mid-response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = ClientWatch(receive)
        outcome = RelayOutcome(self.upstream.status)
        try:
            await relay(self.upstream, send, outcome)
            if outcome.error and self.broke is not None:
                self.broke()
        except asyncio.CancelledError:
            if not watch.left:
                raise
            watch.settle()
        except OSError:
            pass  # the client's socket failed while sending (ASGI 2.4 servers raise it): it left
        finally:
            watch.stop()
            self.upstream.close()


def _complete_events(data: bytes) -> tuple[bytes, bytes]:
    """Split an event stream's bytes into whole events and the unfinished rest."""
    end = 0
    for separator in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        found = data.rfind(separator)
        if found >= 0:
            end = max(end, found + len(separator))
    return data[:end], data[end:]
