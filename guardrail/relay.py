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
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from guardrail.protocols.base import ReplyReader
from guardrail.protocols.openai import error_body

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


def response_headers(upstream: httpx.Response) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers minus hop-by-hop ones, raw bytes, in order."""
    return [(k.lower(), v) for k, v in without_hop_by_hop(upstream.headers.raw)]


@dataclass
class RelayOutcome:
    """How a relayed response ended."""

    status: int
    complete: bool = False  # the whole body reached the client
    disconnected: bool = False  # the client went away first
    error: str | None = None  # the upstream broke mid-response


class UpstreamRelay(Response):
    """An ASGI response that streams an open ``httpx.Response`` to the client."""

    def __init__(
        self,
        upstream: httpx.Response,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        reader: ReplyReader | None = None,
        on_close: Callable[[RelayOutcome], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.reader = reader
        self.on_close = on_close
        self.raw_headers = response_headers(upstream) + (extra_headers or [])
        self.sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = RelayOutcome(self.upstream.status_code)
        relay = asyncio.ensure_future(self._relay(send, outcome))
        watch = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
            if relay not in done:
                outcome.disconnected = True
                relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
        except OSError:
            # The client's socket failed while sending (ASGI 2.4 servers raise it): same as leaving.
            outcome.disconnected = True
        finally:
            watch.cancel()
            relay.cancel()
            await self.upstream.aclose()
            if self.reader is not None:
                self.reader.close()
            if self.on_close is not None:
                self.on_close(outcome)

    async def _relay(self, send: Send, outcome: RelayOutcome) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        # An event stream is passed on in whole events: a partial event is held until its blank line
        # arrives (never delaying a complete one), so a break never leaves half an event in front of
        # the error event.
        held = b""
        try:
            async for chunk in self.upstream.aiter_raw():
                if self.reader is not None:
                    self.reader.feed(chunk)
                if self.sse:
                    chunk, held = _complete_events(held + chunk)
                    if not chunk:
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            outcome.error = f"the upstream broke off mid-response: {_describe(exc)}"
            logger.warning("%s", outcome.error)
            if not self.sse:
                # Returning without the final body message makes the server close the connection,
                # so the client sees the response is incomplete.
                return
            body = error_body(outcome.error, "upstream_error", 502)
            await send({"type": "http.response.body", "body": b"data: " + body + b"\n\n", "more_body": True})
            held = b""
        await send({"type": "http.response.body", "body": held, "more_body": False})
        outcome.complete = outcome.error is None


def _complete_events(data: bytes) -> tuple[bytes, bytes]:
    """Split an event stream's bytes into whole events and the unfinished rest."""
    end = 0
    for separator in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        found = data.rfind(separator)
        if found >= 0:
            end = max(end, found + len(separator))
    return data[:end], data[end:]


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


def _describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
