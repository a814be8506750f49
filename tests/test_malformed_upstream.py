"""An upstream whose response is not valid HTTP/1.1: the passthrough answers 502 with an OpenAI-style
error body, as the guarded chat path does, never a traceback, and goes on serving."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import orjson
import pytest

from samples import ON_TOPIC
from upstreams import ProxyServer, RawUpstream, Script

ON = ON_TOPIC[0]

StartProxy = Callable[..., ProxyServer]

MODELS = b'{"object": "list", "data": []}'

MALFORMED = {
    "content-length-and-transfer-encoding": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
    "invalid-status-line": (
        b"HTTP/1.1 2x0 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    ),
    "duplicated-content-length": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: 2\r\ncontent-length: 2\r\n\r\n{}"
    ),
}


def malformed_first(response: bytes, times: int = 1) -> Script:
    """Answer the first ``times`` requests with ``response``, every later one with a valid model list."""

    async def script(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(upstream.requests) <= times:
            writer.write(response)
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                + f"content-length: {len(MODELS)}\r\n\r\n".encode()
                + MODELS
            )
        await writer.drain()
        await asyncio.sleep(0.05)

    return script


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the server logged as an unhandled exception in the app."""
    return [
        r.getMessage()
        for r in caplog.records
        if "Exception in ASGI application" in r.getMessage() or r.exc_info is not None
    ]


@pytest.mark.parametrize("response", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_upstream_response_is_a_502_with_an_openai_error(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture, response: bytes
) -> None:
    caplog.set_level(logging.WARNING)
    with RawUpstream(malformed_first(response)) as upstream:
        proxy = start_proxy(upstream.url)
        failed = proxy.http().get("/v1/models")
        assert proxy.metric("guardrail_upstream_errors_total", kind="broken") == 1

    assert failed.status_code == 502
    assert failed.headers["content-type"].startswith("application/json")
    error = orjson.loads(failed.content)["error"]
    assert isinstance(error, dict)
    assert error["type"] == "upstream_error"
    assert "RemoteProtocolError" in error["message"]
    assert "Traceback" not in failed.text
    assert tracebacks(caplog) == []
    assert proxy.metric("guardrail_upstream_errors_total", kind="unreachable") == 0


def test_a_malformed_response_to_a_streamed_upload_is_a_502(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with RawUpstream(malformed_first(MALFORMED["duplicated-content-length"])) as upstream:
        proxy = start_proxy(upstream.url)
        failed = proxy.http().post("/v1/responses", json={"input": "hello"})

    assert failed.status_code == 502
    assert orjson.loads(failed.content)["error"]["type"] == "upstream_error"
    assert upstream.requests[0].json() == {"input": "hello"}
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("response", MALFORMED.values(), ids=MALFORMED.keys())
def test_the_proxy_goes_on_serving_after_a_malformed_response(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture, response: bytes
) -> None:
    caplog.set_level(logging.WARNING)
    with RawUpstream(malformed_first(response, times=2)) as upstream:
        proxy = start_proxy(upstream.url)
        client = proxy.http()
        statuses = [client.get("/v1/models").status_code for _ in range(2)]
        recovered = client.get("/v1/models")
        healthy = client.get("/healthz")

    assert statuses == [502, 502]
    assert recovered.status_code == 200
    assert recovered.content == MODELS
    assert healthy.status_code == 200
    assert len(upstream.requests) == 3
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("response", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_response_to_a_passed_chat_is_a_broken_one(
    start_proxy: StartProxy, response: bytes
) -> None:
    with RawUpstream(malformed_first(response)) as upstream:
        proxy = start_proxy(upstream.url)
        failed = proxy.http().post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": ON}]}
        )
        broken = proxy.metric("guardrail_upstream_errors_total", kind="broken")
        unreachable = proxy.metric("guardrail_upstream_errors_total", kind="unreachable")

    assert failed.headers["x-guardrail-verdict"] == "passed"
    assert failed.status_code == 502
    assert orjson.loads(failed.content)["error"]["message"].startswith("the upstream's response was broken (")
    assert (broken, unreachable) == (1, 0)


def test_a_body_that_turns_malformed_midway_ends_within_the_read_timeout(start_proxy: StartProxy) -> None:
    # Valid headers and a first chunk, then a chunk size that is not hex. aiohttp's parser fails the
    # connection without failing the body being read, so an unbounded read would wait forever.
    async def script(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"zz\r\nbad\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    with RawUpstream(script) as upstream:
        proxy = start_proxy(upstream.url, read_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            proxy.http().get("/v1/models")
        took = time.monotonic() - started
        healthy = proxy.http().get("/healthz")
        broken = proxy.metric("guardrail_upstream_errors_total", kind="broken")

    assert took < 5.0
    assert broken == 1
    assert healthy.status_code == 200
