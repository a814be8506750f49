"""The way to the upstream: connection pools with timeouts and limits on by default.

A guarded request that passed (the whole body in memory) goes through ``http1.Pool``, a lean HTTP/1.1
client of our own, unless an HTTP(S)_PROXY applies; everything else (the passthrough, with bodies
streamed from the client, and anything through a proxy) through one shared aiohttp session. Why two:
see ``guardrail/http1.py``.

Requests are sent as the client made them: no cookie jar (a shared one would send one user's session
cookie with another user's request), no redirects followed, no default Accept, Accept-Encoding or
User-Agent added, and bodies neither compressed nor decompressed. aiohttp's C-accelerated HTTP/1.1
client is used directly: the proxy's hot path measured httpx's own transport at 1.0 to 2.5 ms of
event-loop CPU per request, and httpx's request and response objects around aiohttp at a fifth of the
loop's time (benchmarks/proxy_speed.py). Errors become one ``UpstreamError`` at the boundary, which the
proxy answers with 502 or 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import aiohttp
import yarl
from aiohttp.http_exceptions import HttpProcessingError

from guardrail.errors import ConfigError, Failure, UpstreamError
from guardrail.http1 import Pool, Response, address


@contextlib.contextmanager
def _translated(connecting: bool) -> Iterator[None]:
    """aiohttp's exceptions as ``UpstreamError``s, named as httpx names them (ConnectError,
    ReadTimeout, ...): library-neutral, and what people search their logs for."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise UpstreamError("timeout", _describe("ConnectTimeout", exc)) from exc
    except aiohttp.SocketTimeoutError as exc:
        raise UpstreamError("timeout", _describe("ReadTimeout", exc)) from exc
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:
        name = "PoolTimeout" if connecting else "ReadTimeout"
        raise UpstreamError("timeout", _describe(name, exc)) from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamError("unreachable", _describe("ConnectError", exc)) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        kind: Failure = "unreachable" if connecting else "broken"
        raise UpstreamError(kind, _describe("RemoteProtocolError", exc)) from exc
    except aiohttp.ClientResponseError as exc:
        # The upstream answered, but not in valid HTTP/1.1 (an invalid status line, Content-Length
        # with Transfer-Encoding or twice, ...): a broken response, not an unreachable upstream.
        raise UpstreamError("broken", _malformed(exc.message)) from exc
    except aiohttp.ClientError as exc:
        cause = exc.__cause__
        if isinstance(cause, HttpProcessingError):
            raise UpstreamError("broken", _malformed(cause.message)) from exc
        if cause is not None and not isinstance(cause, (OSError, aiohttp.ClientError, asyncio.TimeoutError)):
            # The upload's own iterator failed (the proxy's body limit): that error, as it was raised.
            raise cause from None
        if connecting:
            raise UpstreamError("unreachable", _describe("ConnectError", exc)) from exc
        raise UpstreamError("broken", _describe("ReadError", exc)) from exc


def _describe(name: str, exc: BaseException) -> str:
    return f"{name}: {exc}" if str(exc) else name


def _malformed(message: str) -> str:
    """A parser error as a one-line detail: aiohttp's message goes on to quote the offending line."""
    reason = message.strip().split("\n", 1)[0].rstrip(" :")
    detail = "RemoteProtocolError: the upstream's response is not valid HTTP/1.1"
    return f"{detail}: {reason}" if reason else detail


class AiohttpResponse:
    """An upstream response through aiohttp whose body has not been read yet (the same interface as
    ``http1.Response``)."""

    def __init__(self, response: aiohttp.ClientResponse, read_timeout: float | None) -> None:
        self._response = response
        self._read_timeout = read_timeout
        self.status = response.status
        self.headers: list[tuple[bytes, bytes]] = list(response.raw_headers)
        self.content_type = response.headers.get("content-type", "")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, each chunk as soon as it arrives (so event streams are not held up). After the
        last chunk ``at_eof`` is true, so a relay can send it as the end of the response."""
        content = self._response.content
        with _translated(connecting=False):
            while True:
                # Each read has its own bound: when aiohttp's parser fails midway through a body, it
                # closes the connection without failing the body, and drops its own read timeout.
                chunk = await asyncio.wait_for(content.readany(), self._read_timeout)
                if not chunk:
                    return
                yield chunk
                if content.at_eof():
                    return

    def at_eof(self) -> bool:
        """The whole body has been read."""
        return self._response.content.at_eof()

    def close(self) -> None:
        """A body read to the end gives its connection back to the pool; one abandoned midway (a
        client that left) closes it, which is what tells the upstream to stop generating."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


# What ``Upstream.send`` returns: status, headers, content_type, chunks(), at_eof() and close().
UpstreamResponse = AiohttpResponse | Response


class Upstream:
    """Sends requests to one upstream URL's origin over a shared pool, created on first use."""

    def __init__(
        self,
        url: str,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        max_connections: int = 100,
        trust_env: bool = True,
    ) -> None:
        parsed = yarl.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"the upstream URL must be http:// or https:// with a host, not {url!r}")
        self.origin = str(parsed.origin())
        self.prefix = parsed.raw_path.rstrip("/")
        self.max_connections = max_connections
        self.trust_env = trust_env
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str], str | None] = {}
        self._is_direct: bool | None = None
        # Guarded requests (the whole body in memory, no HTTP(S)_PROXY) take the lean client instead.
        self._pool = Pool(
            parsed.scheme,
            parsed.raw_host or "",
            parsed.port or (443 if parsed.scheme == "https" else 80),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=max_connections,
        )

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

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=5.0),
                # aiohttp's own trust_env looks proxies and .netrc up in a thread for every request
                # (a hand-off that cost the proxy 0.5 ms each): _proxy() reads the environment once.
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                auto_decompress=False,
                timeout=self.timeout,
            )
        return self._session

    def _proxy(self, url: yarl.URL) -> str | None:
        """The HTTP(S)_PROXY for this scheme and host, unless NO_PROXY exempts it; read once per origin."""
        key = (url.scheme, url.host or "")
        if key not in self._proxies:
            proxy = None
            if self.trust_env and not urllib.request.proxy_bypass(key[1]):
                proxy = urllib.request.getproxies_environment().get(url.scheme)
            self._proxies[key] = proxy
        return self._proxies[key]

    def _direct(self) -> bool:
        """The origin is reached without an HTTP(S)_PROXY."""
        if self._is_direct is None:
            self._is_direct = self._proxy(yarl.URL(self.origin)) is None
        return self._is_direct

    async def send(
        self, method: str, url: str, headers: Sequence[tuple[bytes, bytes]], body: Any = None
    ) -> UpstreamResponse:
        """Send a request (``body``: bytes, an async iterator of bytes, or None); the response's body
        is left to be streamed."""
        if isinstance(body, bytes) and url.startswith(self.origin) and self._direct():
            path = url[len(self.origin) :]
            path = path if path.startswith("/") else f"/{path}"
            return await self._pool.request(method, path, headers, body)
        # As sent: yarl would otherwise re-quote the path and query ("%2F" becomes "/").
        target = yarl.URL(url, encoded=True)
        # Transfer-Encoding is aiohttp's to set, from the body it is given.
        fields = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in headers
            if k.lower() != b"transfer-encoding"
        ]
        with _translated(connecting=True):
            response = await self._open().request(
                method,
                target,
                headers=fields,
                data=body,
                allow_redirects=False,
                compress=False,
                proxy=self._proxy(target),
            )
        return AiohttpResponse(response, self.timeout.sock_read)

    def address(self) -> tuple[str, int]:
        """Where the pool connects for this upstream: its host and port, or those of the HTTP(S)_PROXY
        its requests go through."""
        origin = yarl.URL(self.origin)
        via = self._proxy(origin)
        target = yarl.URL(via) if via else origin
        return target.host or "", target.port or (443 if target.scheme == "https" else 80)

    async def aclose(self) -> None:
        """Close the pools' connections."""
        await self._pool.aclose()
        if self._session is not None:
            await self._session.close()


READY_TTL = 5.0  # seconds an upstream check answers /readyz
READY_TIMEOUT = 2.0  # seconds the upstream gets to accept the check's connection (or connect_timeout)


class UpstreamCheck:
    """Whether the upstream accepts a TCP connection, found out at most once every ``ttl`` seconds."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = READY_TIMEOUT,
        ttl: float = READY_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.ttl = ttl
        self._clock = clock
        self._last: tuple[float, str | None] | None = None  # (when, the problem or None)
        self._running: asyncio.Task[str | None] | None = None

    @classmethod
    def of(cls, upstream: Upstream, timeout: float = READY_TIMEOUT) -> UpstreamCheck:
        """The check of the address ``upstream``'s connection pool connects to."""
        return cls(*upstream.address(), timeout)

    @property
    def address(self) -> str:
        """host:port, as a message names it."""
        return address(self.host, self.port)

    async def problem(self) -> str | None:
        """What keeps the upstream from being reached, or None when it accepts connections."""
        if self._last is not None and self._clock() - self._last[0] < self.ttl:
            return self._last[1]
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._connect())
            self._running.add_done_callback(self._done)
        # Shielded: a probe that gives up does not cancel the check the others wait for.
        return await asyncio.shield(self._running)

    def _done(self, task: asyncio.Task[str | None]) -> None:
        self._running = None
        if not task.cancelled() and task.exception() is None:
            self._last = (self._clock(), task.result())

    async def _connect(self) -> str | None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
        except asyncio.TimeoutError:  # before OSError: it is one
            return f"the upstream ({self.address}) did not accept a connection within {self.timeout:g} s"
        except OSError as exc:
            return f"the upstream ({self.address}) cannot be reached: {exc.strerror or exc}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None
