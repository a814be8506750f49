"""An httpx transport on aiohttp: the proxy keeps httpx's API and spends a quarter of its CPU.

Measured on the proxy's hot path (benchmarks/proxy_speed.py): forwarding a request with httpx's own
transport (httpcore on anyio) cost 1.0 to 2.5 ms of event-loop CPU, more than the rest of the proxy
together; aiohttp's C-accelerated HTTP/1.1 client does the same in about 0.25 ms. The client stays an
``httpx.AsyncClient`` (timeouts, limits, requests and responses, and ``MockTransport`` in tests), and
aiohttp's errors are translated into httpx's here, at the boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import yarl


@contextlib.contextmanager
def _translated(request: httpx.Request, connecting: bool) -> Iterator[None]:
    """aiohttp's exceptions as the httpx ones the proxy maps to 502 and 504."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connecting timed out", request=request) from exc
    except aiohttp.SocketTimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "reading timed out", request=request) from exc
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:
        kind = httpx.PoolTimeout if connecting else httpx.ReadTimeout
        raise kind(str(exc) or "timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except aiohttp.ClientError as exc:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, (OSError, aiohttp.ClientError, asyncio.TimeoutError)):
            # The upload's own iterator failed (the proxy's body limit): that error, as it was raised.
            raise cause from None
        error = httpx.ConnectError if connecting else httpx.ReadError
        raise error(str(exc) or type(exc).__name__, request=request) from exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _translated(self._request, connecting=False):
            # iter_any: each chunk as soon as it arrives, so event streams are not held up.
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        # A body read to the end gives its connection back to the pool; one abandoned midway (a client
        # that left) closes it, which is what tells the upstream to stop generating.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one shared ``aiohttp.ClientSession``, created on first use."""

    def __init__(self, limits: httpx.Limits | None = None, trust_env: bool = True) -> None:
        self.limits = limits if limits is not None else httpx.Limits()
        self.trust_env = trust_env
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str], str | None] = {}

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.limits.max_connections or 0,
                keepalive_timeout=self.limits.keepalive_expiry or 0,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # aiohttp's own trust_env looks proxies and .netrc up in a thread for every request
                # (a hand-off that cost the proxy 0.5 ms each): _proxy() reads the environment once.
                trust_env=False,
                # Send only what the client sent: no default Accept, Accept-Encoding or User-Agent.
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    def _proxy(self, url: httpx.URL) -> str | None:
        """The HTTP(S)_PROXY for this scheme and host, unless NO_PROXY exempts it; read once per origin."""
        key = (url.scheme, url.host)
        if key not in self._proxies:
            proxy = None
            if self.trust_env and not urllib.request.proxy_bypass(url.host):
                proxy = urllib.request.getproxies_environment().get(url.scheme)
            self._proxies[key] = proxy
        return self._proxies[key]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request; the response's body is streamed."""
        timeout: dict[str, float | None] = request.extensions.get("timeout", {})
        data: Any
        try:
            data = request.content or None
        except httpx.RequestNotRead:
            data = request.stream  # a streamed upload: aiohttp reads the async iterator
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "transfer-encoding"]
        with _translated(request, connecting=True):
            response = await self._open().request(
                request.method,
                # As sent: yarl would otherwise re-quote the path and query ("%2F" becomes "/").
                yarl.URL(str(request.url), encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=False,
                proxy=self._proxy(request.url),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        return httpx.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=_Body(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
