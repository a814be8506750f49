"""A lean HTTP/1.1 client for the guarded path: keep-alive connections to one origin, httptools' parser.

Every judged request that passes goes upstream through here; everything else (the passthrough, request
bodies streamed from the client, an upstream reached through an HTTP(S)_PROXY) goes through aiohttp in
``upstream.py``. Why a client of our own for this one path: the request it sends is always the same kind
(a POST with the whole body in memory), and right after the encoder has run, the event loop's code is
cold, so every layer of Python between the proxy and the socket costs several times its warm price. At
one client, a minimal guarding forwarder (``benchmarks/proxy_speed.py --serve-floor``) added 1.12 ms
beyond the encoder with aiohttp and 0.64 ms with a client like this one (medians of 4 interleaved
rounds), and its event loop spent 0.55 ms against 0.28 ms per request.

What it does, as aiohttp did for this path:
- connects with ``connect_timeout``, over TLS for https (the system's default certificates);
- keeps up to ``max_connections`` connections, reuses idle ones for ``keepalive`` seconds, and retries
  once on a new connection when a reused one turns out closed before any byte of the answer;
- fails a response when ``read_timeout`` passes between two reads of a waiting reader;
- reads Content-Length, chunked and close-delimited bodies, skips 1xx answers, and pauses reading when
  more than ``HIGH_WATER`` bytes wait for a slow client;
- closing a response not read to the end closes its connection, which tells the upstream to stop.

Its failures are ``UpstreamError``s named as upstream.py names aiohttp's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence

import httptools

from guardrail.errors import Failure, UpstreamError

HIGH_WATER = 256 * 1024  # body bytes held for a slow reader before reading pauses (until it takes them)


def bracketed(host: str) -> str:
    """A host as a URL or a Host header writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def address(host: str, port: int) -> str:
    """host:port, as the Host header and messages write it."""
    return f"{bracketed(host)}:{port}"


class Pool:
    """Keep-alive HTTP/1.1 connections to one origin."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        max_connections: int = 100,
        keepalive: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.keepalive = keepalive
        self._https = scheme == "https"
        self._ssl: ssl.SSLContext | None = None  # made on first use: loading the certificates takes a while
        default = 443 if self._https else 80
        self._host_header = (bracketed(host) if port == default else address(host, port)).encode("ascii")
        self._idle: list[_Connection] = []  # the most recently used last
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        """Send a request and wait for the response's status and headers; its body is left to stream."""
        head = [f"{method} {target} HTTP/1.1\r\nhost: ".encode("latin-1"), self._host_header, b"\r\n"]
        for key, value in headers:
            if key.lower() not in (b"host", b"content-length", b"transfer-encoding"):
                head += (key, b": ", value, b"\r\n")
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        message = b"".join(head) + body
        for attempt in (1, 2):
            connection, reused = await self._acquire()
            try:
                await connection.send(message)
            except UpstreamError as exc:
                self._discard(connection)
                # A kept-alive connection the upstream had closed meanwhile: once more, on a new one.
                # The other idle ones are likely as stale (an upstream restart), so they go too.
                if reused and attempt == 1 and exc.kind == "unreachable" and not connection.received:
                    self._close_idle()
                    continue
                raise
            except BaseException:
                self._discard(connection)
                raise
            return Response(self, connection)
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        """Close every idle connection; those in use close when their responses do."""
        self._closed = True
        self._close_idle()

    def _close_idle(self) -> None:
        while self._idle:
            self._idle.pop().close()
            self._open -= 1

    async def _acquire(self) -> tuple[_Connection, bool]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            now = loop.time()
            while self._idle:
                connection = self._idle.pop()
                if not connection.lost and now - connection.idle_since < self.keepalive:
                    return connection, True
                connection.close()
                self._open -= 1
            if self._open < self.max_connections:
                break
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - now))
            except asyncio.TimeoutError:
                raise UpstreamError(
                    "timeout", f"PoolTimeout: no free connection among {self.max_connections}"
                ) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._open += 1
        if self._https and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self.read_timeout),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                ),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            self._open -= 1
            self._wake()
            detail = f"ConnectTimeout: {address(self.host, self.port)} did not accept a connection in time"
            raise UpstreamError("timeout", detail) from None
        except OSError as exc:
            self._open -= 1
            self._wake()
            detail = f"ConnectError: cannot connect to {address(self.host, self.port)}: {exc}"
            raise UpstreamError("unreachable", detail) from exc
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        return connection, False

    def _release(self, connection: _Connection) -> None:
        """A connection whose response was read to the end, back to the pool if it can be reused."""
        if connection.reusable and not self._closed:
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
            self._wake()
        else:
            self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class Response:
    """An upstream response whose body has not been read yet."""

    def __init__(self, pool: Pool, connection: _Connection) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = connection.status
        self.headers = connection.headers
        self.content_type = connection.content_type

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: what has arrived since the last chunk, joined. After the last
        chunk ``at_eof`` is true."""
        connection = self._connection
        if connection is None:
            return
        while True:
            chunk = connection.take()
            if chunk:
                yield chunk
            elif connection.complete:
                return
            else:
                await connection.readable()

    def at_eof(self) -> bool:
        """The whole body has been read."""
        connection = self._connection
        return connection is None or (connection.complete and not connection.buffered)

    def close(self) -> None:
        """A body read to the end gives its connection back to the pool; one abandoned midway (a
        client that left) closes it, which is what tells the upstream to stop generating."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.complete and not connection.buffered:
            self._pool._release(connection)
        else:
            self._pool._discard(connection)


class _Connection(asyncio.Protocol):
    """One connection: the request written, the response parsed as it arrives (httptools callbacks)."""

    def __init__(self, read_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._read_timeout = read_timeout
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.lost = False
        self.idle_since = 0.0
        self._begin()

    def _begin(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = ""
        self.received = False  # any byte of this response
        self.headed = False
        self.complete = False
        self.reusable = False
        self.buffered = 0
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_since = 0.0
        self._last_read = 0.0
        self._error: UpstreamError | None = None
        self._informational = False
        self._until_close = False
        self._paused = False

    # Used by Pool and Response -------------------------------------------------------------------

    async def send(self, message: bytes) -> None:
        """Write a request and wait for its response's head."""
        self._begin()
        assert self._transport is not None
        self._transport.write(message)
        self._last_read = self._loop.time()
        self._timer = self._loop.call_at(self._last_read + self._read_timeout, self._watch)
        while not self.headed:
            await self.readable()

    def take(self) -> bytes:
        """Everything buffered, or b"" (then ``readable`` waits for more)."""
        if not self._chunks:
            return b""
        chunk = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self.buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunk

    async def readable(self) -> None:
        """Wait for more of the response; raises what broke it."""
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        self._waiting_since = self._loop.time()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None and not self._chunks:
            raise self._error

    def close(self) -> None:
        self._stop_timer()
        if self._transport is not None and not self.lost:
            self._transport.close()
        self.lost = True

    # asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # It answered, if not in HTTP/1.1: a broken response even before its head was whole.
            self._fail(
                "RemoteProtocolError", f"the upstream's response is not valid HTTP/1.1: {exc}", "broken"
            )
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        ours = self.lost  # close() was called: nothing more to read
        self.lost = True
        self._stop_timer()
        unfinished = not ours and not self.complete and self._timer_started()
        if unfinished and self.headed and self._until_close and exc is None and self._error is None:
            self.complete = True  # a body delimited by the end of the connection
        elif unfinished:
            where = "mid-response" if self.headed else "before answering"
            self._fail("RemoteProtocolError", f"the upstream closed the connection {where}")
        self._wake()

    # httptools callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True  # "100 Continue" and the like: the answer comes after
            return
        self.status = status
        chunked = length = False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-type":
                self.content_type = value.decode("latin-1")
            elif lowered == b"content-length":
                length = True
            elif lowered == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        self._until_close = not (chunked or length or status in (204, 304))
        self.headed = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.complete = True
        self.reusable = self._parser.should_keep_alive() and not self._until_close
        self._stop_timer()

    # Internals -----------------------------------------------------------------------------------

    def _timer_started(self) -> bool:
        return self._last_read > 0.0  # a request was sent on this connection

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, name: str, detail: str, kind: Failure | None = None) -> None:
        """Fail the response: ``kind``, or by default "broken" once its head arrived, else "unreachable"
        (what the pool retries on a new connection when the reused one was stale)."""
        if self._error is None:
            if kind is None:
                kind = "broken" if self.headed else "unreachable"
            self._error = UpstreamError(kind, f"{name}: {detail}")
        self.reusable = False
        if self._transport is not None:
            self._transport.close()
        self._wake()

    def _watch(self) -> None:
        """The read timeout: fails the response when a reader has waited ``read_timeout`` since the
        last bytes arrived (or since it began to wait, if later); otherwise checks again then."""
        self._timer = None
        if self.complete or self.lost:
            return
        now = self._loop.time()
        waiting = self._waiter is not None
        due = max(self._last_read, self._waiting_since if waiting else now) + self._read_timeout
        if waiting and now >= due:
            detail = f"ReadTimeout: no data from the upstream in {self._read_timeout:g} s"
            self._error = UpstreamError("timeout", detail)
            self.close()
            self._wake()
            return
        self._timer = self._loop.call_at(due, self._watch)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
