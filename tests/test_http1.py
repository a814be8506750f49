"""guardrail.http1, the lean HTTP/1.1 client, against raw asyncio servers that write scripted bytes.

Each test runs its own event loop (``asyncio.run``) with the server in it on 127.0.0.1, so faults are
exact: a server that never answers, stalls mid-body, cuts the body off or closes an idle connection.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from guardrail import http1
from guardrail.errors import UpstreamError

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
T = TypeVar("T")
Script = Callable[["Server", Reader, Writer], Awaitable[None]]

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def closed_port() -> int:
    """A local port where nothing listens (as tests/upstreams.py, without importing its heavy deps)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A raw HTTP/1.1 server: every accepted connection runs ``script``; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.ended = 0  # connections whose script returned, mostly on the client's EOF
        self.requests: list[bytes] = []  # each request's head and body, as received
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def pool(self, **options: float) -> http1.Pool:
        options.setdefault("connect_timeout", 0.5)
        options.setdefault("read_timeout", 0.5)
        return http1.Pool("http", "127.0.0.1", self.port, **options)  # type: ignore[arg-type]

    async def read_request(self, reader: Reader) -> bytes:
        """One request: the head up to the blank line, then content-length bytes of body."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def _handle(self, reader: Reader, writer: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self.script(self, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test is over
        finally:
            self.ended += 1
            self._tasks.discard(task)
            writer.close()


def serving(*steps: bytes | float | asyncio.Event, close: bool = False) -> Script:
    """For each request on a connection: write bytes, sleep seconds, wait for events, in order; with
    ``close``, hang up after the first. Otherwise the script ends on the client's EOF."""

    async def script(server: Server, reader: Reader, writer: Writer) -> None:
        while True:
            await server.read_request(reader)
            for step in steps:
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                elif isinstance(step, asyncio.Event):
                    await step.wait()
                else:
                    await asyncio.sleep(step)
            if close:
                return

    return script


async def until(condition: Callable[[], bool], timeout: float = 0.2) -> None:
    """Wait for ``condition`` to hold (what a server sees happens on its own schedule)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def read_all(response: http1.Response) -> bytes:
    return b"".join([chunk async for chunk in response.chunks()])


async def fetch(pool: http1.Pool, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await pool.request("POST", "/v1/chat/completions", [], body)
    try:
        received = await read_all(response)
        assert response.at_eof()
        return response.status, received
    finally:
        response.close()


def run(coro: Awaitable[T]) -> T:
    """Run a test's coroutine in a new event loop; a hang fails it instead of blocking the suite."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, 3)

    return asyncio.run(bounded())


def fails(kind: str, name: str, coro: Awaitable[object]) -> None:
    """Run ``coro``; it must raise an UpstreamError of this kind whose detail starts with this name."""
    with pytest.raises(UpstreamError) as info:
        run(coro)
    assert (info.value.kind, info.value.detail.split(":")[0]) == (kind, name), info.value.detail


def test_content_length_response_and_the_request_as_sent() -> None:
    answer = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Trace-ID: t-1\r\n"
    answer += b'content-length: 11\r\n\r\n{"ok":true}'
    body = b'{"model":"m","messages":[]}'
    headers = [(b"Authorization", b"Bearer sk-1"), (b"content-type", b"application/json")]
    headers += [(b"Host", b"evil.example"), (b"Content-Length", b"9"), (b"Transfer-Encoding", b"chunked")]

    async def main() -> None:
        async with Server(serving(answer)) as server:
            pool = server.pool()
            response = await pool.request("POST", "/v1/chat/completions", headers, body)
            assert response.status == 201
            assert response.headers == [
                (b"Content-Type", b"application/json"),
                (b"X-Trace-ID", b"t-1"),
                (b"content-length", b"11"),
            ]
            assert response.content_type == "application/json"
            assert not response.at_eof()
            assert await read_all(response) == b'{"ok":true}'
            assert response.at_eof()
            response.close()
            await pool.aclose()
            head, _, received_body = server.requests[0].partition(b"\r\n\r\n")
            line, *lines = head.split(b"\r\n")
            assert line == b"POST /v1/chat/completions HTTP/1.1"
            assert received_body == body
            names = sorted(h.split(b":")[0].lower() for h in lines)
            assert names == [b"authorization", b"content-length", b"content-type", b"host"]
            assert f"host: 127.0.0.1:{server.port}".encode() in lines
            assert b"Authorization: Bearer sk-1" in lines
            assert b"content-length: %d" % len(body) in lines

    run(main())


@pytest.mark.parametrize(
    ("script", "pause", "keepalive", "connections"),
    [
        (serving(OK), 0.0, 5.0, 1),
        (serving(OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")), 0.0, 5.0, 2),
        (serving(OK, close=True), 0.05, 5.0, 2),  # a keep-alive answer, then the server hangs up
        (serving(OK), 0.1, 0.05, 2),  # idle longer than keepalive
        (serving(b"HTTP/1.1 200 OK\r\n\r\n{}", close=True), 0.0, 5.0, 2),  # the body ends with it
    ],
    ids=["keep-alive", "connection-close", "server-closed-idle", "keepalive-expired", "close-delimited"],
)
def test_connection_reuse(script: Script, pause: float, keepalive: float, connections: int) -> None:
    async def main() -> None:
        async with Server(script) as server:
            pool = server.pool(keepalive=keepalive)
            assert await fetch(pool) == (200, b"{}")
            await asyncio.sleep(pause)
            assert await fetch(pool) == (200, b"{}")
            assert (server.connections, len(server.requests)) == (connections, 2)
            await pool.aclose()  # closes the idle connection, if any
            await until(lambda: server.ended == connections)  # no connection left open

    run(main())


def test_reused_connection_closed_before_answering_is_retried_once() -> None:
    async def script(server: Server, reader: Reader, writer: Writer) -> None:
        await serving(OK, close=server.connections == 1)(server, reader, writer)
        await server.read_request(reader)  # on the first connection, the second request: hang up

    async def main() -> None:
        async with Server(script) as server:
            pool = server.pool()
            assert await fetch(pool) == (200, b"{}")
            assert await fetch(pool, b"second") == (200, b"{}")  # the stale connection was still open
            await pool.aclose()
            assert server.connections == 2
            assert [r.endswith(b"second") for r in server.requests] == [False, True, True]

    run(main())


def test_the_retry_goes_to_a_new_connection_not_another_idle_one() -> None:
    async def script(server: Server, reader: Reader, writer: Writer) -> None:
        await serving(OK, close=server.connections <= 2)(server, reader, writer)
        await server.read_request(reader)  # the first two (a restarted upstream's): hang up

    async def main() -> None:
        async with Server(script) as server:
            pool = server.pool()
            held = [await pool.request("POST", "/", [], b"") for _ in range(2)]  # two connections
            for response in held:
                assert await read_all(response) == b"{}"
                response.close()
            assert await fetch(pool) == (200, b"{}")
            assert server.connections == 3

    run(main())


def test_chunked_response_is_streamed_as_it_arrives() -> None:
    first_seen = asyncio.Event()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    rest = b"5\r\nhello\r\n3\r\n!\n\n\r\n0\r\n\r\n"

    async def main() -> None:
        async with Server(serving(head + b"6\r\ndata: \r\n", first_seen, 0.05, rest)) as server:
            pool = server.pool()
            response = await pool.request("POST", "/v1/chat/completions", [], b"{}")
            assert response.content_type == "text/event-stream"
            received = []
            async for chunk in response.chunks():
                received.append(chunk)
                first_seen.set()  # the server sends the rest only now
            assert received[0] == b"data: "
            assert b"".join(received) == b"data: hello!\n\n"
            assert response.at_eof()
            response.close()
            await pool.aclose()

    run(main())


def test_informational_response_is_skipped() -> None:
    final = OK.replace(b"200 OK", b"202 Accepted")
    script = serving(b"HTTP/1.1 100 Continue\r\n\r\n", 0.05, final)  # not parsed as one message

    async def main() -> None:
        async with Server(script) as server:
            pool = server.pool()
            response = await pool.request("POST", "/", [], b"{}")
            assert response.status == 202
            assert response.content_type == "application/json"
            assert [name for name, _ in response.headers] == [b"Content-Type", b"Content-Length"]
            assert await read_all(response) == b"{}"
            response.close()
            assert await fetch(pool) == (202, b"{}")  # the connection is still usable
            await pool.aclose()
            assert server.connections == 1

    run(main())


def test_connection_refused_is_unreachable() -> None:
    pool = http1.Pool("http", "127.0.0.1", closed_port(), connect_timeout=0.5)
    fails("unreachable", "ConnectError", pool.request("POST", "/", [], b""))


def test_slow_but_steady_body_is_not_a_timeout() -> None:
    trickle = [step for byte in b"abcde" for step in (0.08, bytes([byte]))]  # 0.4 s, no 0.2 s gap

    async def main() -> None:
        async with Server(serving(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", *trickle)) as server:
            pool = server.pool(read_timeout=0.2)
            assert await fetch(pool) == (200, b"abcde")
            await pool.aclose()

    run(main())


@pytest.mark.parametrize(
    ("script", "kind", "name"),
    [
        (serving(), "timeout", "ReadTimeout"),  # never answers
        (serving(close=True), "unreachable", "RemoteProtocolError"),  # hangs up: no retry when fresh
        (serving(b"garbage\r\n\r\n"), "broken", "RemoteProtocolError"),  # answers, not in HTTP/1.1
    ],
    ids=["no-answer", "hang-up", "garbage"],
)
def test_no_valid_answer_fails_the_request(script: Script, kind: str, name: str) -> None:
    servers: list[Server] = []

    async def main() -> None:
        async with Server(script) as server:
            servers.append(server)
            started = time.monotonic()
            try:
                await server.pool(read_timeout=0.2).request("POST", "/", [], b"")
            finally:
                assert (time.monotonic() - started > 0.19) == (kind == "timeout")

    fails(kind, name, main())
    assert servers[0].connections == 1


LENGTH_10 = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("script", "kind", "name"),
    [
        (serving(LENGTH_10 + b"hello"), "timeout", "ReadTimeout"),  # stalls mid-body
        (serving(LENGTH_10 + b"hello", close=True), "broken", "RemoteProtocolError"),  # cut off
        # The valid part and the bad framing arrive together, while the client waits for the body.
        (serving(CHUNKED, 0.05, b"5\r\nhello\r\nzz\r\n"), "broken", "RemoteProtocolError"),
    ],
    ids=["stall", "cut-off", "bad-chunk"],
)
def test_a_body_that_breaks_yields_what_arrived_then_fails(script: Script, kind: str, name: str) -> None:
    received: list[bytes] = []

    async def main() -> None:
        async with Server(script) as server:
            response = await server.pool(read_timeout=0.2).request("POST", "/", [], b"")
            try:
                async for chunk in response.chunks():
                    received.append(chunk)
            finally:
                assert not response.at_eof()
                response.close()

    fails(kind, name, main())
    assert received == [b"hello"]


def test_pool_limit_times_out_then_frees_the_connection() -> None:
    async def main() -> None:
        async with Server(serving(OK)) as server:
            pool = server.pool(max_connections=1, connect_timeout=0.2)
            held = await pool.request("POST", "/", [], b"")
            started = time.monotonic()
            with pytest.raises(UpstreamError) as info:
                await pool.request("POST", "/", [], b"")
            assert 0.19 < time.monotonic() - started < 0.5
            assert (info.value.kind, info.value.detail.split(":")[0]) == ("timeout", "PoolTimeout")
            waiting = asyncio.ensure_future(fetch(pool))  # this one gets the connection once freed
            await asyncio.sleep(0.05)
            assert not waiting.done()
            assert await read_all(held) == b"{}"
            held.close()
            assert await asyncio.wait_for(waiting, 0.1) == (200, b"{}")
            assert await fetch(pool) == (200, b"{}")
            await pool.aclose()
            assert server.connections == 1

    run(main())


def test_closing_an_unread_response_closes_the_connection() -> None:
    async def main() -> None:
        async with Server(serving(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")) as server:
            pool = server.pool(max_connections=1)
            response = await pool.request("POST", "/", [], b"")
            async for chunk in response.chunks():
                assert chunk == b"first"
                break
            response.close()
            await until(lambda: server.ended == 1)  # the server saw EOF
            assert (await pool.request("POST", "/", [], b"")).status == 200  # the slot was freed
            assert server.connections == 2
            await pool.aclose()

    run(main())


def test_large_body_with_a_slow_reader_arrives_intact() -> None:
    payload = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # 4 MiB, far above HIGH_WATER
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload

    async def main() -> None:
        async with Server(serving(answer)) as server:
            pool = server.pool()
            response = await pool.request("POST", "/", [], b"")
            await asyncio.sleep(0.1)  # the client does not read for a moment
            connection = response._connection
            assert connection is not None
            assert connection.buffered <= 2 * http1.HIGH_WATER  # reading paused, not 4 MiB held
            body = await read_all(response)
            assert len(body) == len(payload)
            assert body == payload
            assert response.at_eof()
            response.close()
            await pool.aclose()

    run(main())
