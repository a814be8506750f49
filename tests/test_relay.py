"""The relay end to end: unbuffered streams, clients that leave, upstreams that break mid-response."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from samples import OFF_TOPIC, ON_TOPIC
from upstreams import (
    UPSTREAM_REPLY,
    UPSTREAM_USAGE,
    FakeOpenAI,
    ProxyServer,
    RawUpstream,
    cut_json,
    cut_sse,
    hang,
    slow_sse,
    sse_chunks,
    sse_head,
    stall_after_headers,
)
from upstreams import (
    chunk as http_chunk,
)

MODEL = "gpt-test"
ON = ON_TOPIC[0]
OFF = OFF_TOPIC[0]
EVENTS = sse_chunks(UPSTREAM_REPLY)  # role, one per word, stop, [DONE]
WORDS = UPSTREAM_REPLY.split(" ")

StartProxy = Callable[..., ProxyServer]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def chat_body(stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": user(ON), "stream": stream}


# Streams are relayed as they arrive ---------------------------------------------------------------


def test_chat_stream_is_relayed_as_it_arrives(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    fake_upstream.pause = 1.0  # after the first content chunk
    started = time.monotonic()
    stream = proxy.sdk().chat.completions.create(model=MODEL, messages=user(ON), stream=True)

    arrivals: list[float] = []
    parts: list[str] = []
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        parts.append(chunk.choices[0].delta.content or "")

    assert "".join(parts) == UPSTREAM_REPLY
    assert arrivals[1] < 0.5  # the first word, before the upstream's pause
    assert arrivals[-1] > 1.0


def test_passthrough_stream_is_relayed_as_it_arrives(start_proxy: StartProxy) -> None:
    with RawUpstream(slow_sse(EVENTS, pause=1.0)) as upstream:
        proxy = start_proxy(upstream.url)
        started = time.monotonic()
        with proxy.http().stream("POST", "/v1/responses", json={"stream": True}) as response:
            chunks = [(time.monotonic() - started, chunk) for chunk in response.iter_raw()]

    assert response.headers["content-type"] == "text/event-stream"
    assert chunks[0][1] == EVENTS[0]
    assert chunks[0][0] < 0.5
    assert chunks[-1][0] > 1.0
    assert b"".join(c for _, c in chunks) == b"".join(EVENTS)


# A client that leaves closes the upstream ---------------------------------------------------------


def test_client_disconnect_closes_the_upstream(start_proxy: StartProxy) -> None:
    with RawUpstream(slow_sse(EVENTS[1:], pause=10.0)) as upstream:
        proxy = start_proxy(upstream.url)
        raw = proxy.sdk().chat.completions.with_raw_response.create(
            model=MODEL, messages=user(ON), stream=True
        )
        stream = raw.parse()
        first = next(iter(stream))
        stream.close()

        assert upstream.closed.wait(2.0), "the upstream never saw its client leave"
    assert first.choices[0].delta.content == WORDS[0]
    assert upstream.closed_after is not None
    assert upstream.closed_after < 1.5
    record = proxy.record(raw.headers["x-guardrail-id"])
    assert record["verdict"] == "passed"
    assert record["upstream"]["error"] == "the client disconnected"
    assert record["reply"] == WORDS[0]  # what was relayed before the client left


def test_client_disconnect_on_a_passthrough_stream_closes_the_upstream(start_proxy: StartProxy) -> None:
    with RawUpstream(slow_sse(EVENTS, pause=10.0)) as upstream:
        proxy = start_proxy(upstream.url)
        with proxy.http().stream("POST", "/v1/responses", json={"stream": True}) as response:
            assert next(response.iter_raw()) == EVENTS[0]

        assert upstream.closed.wait(2.0), "the upstream never saw its client leave"
    assert proxy.records() == []


def test_client_leaving_before_the_upstream_answers_closes_the_upstream(start_proxy: StartProxy) -> None:
    # A non-streamed completion sends no headers until the whole reply is generated: a client that
    # gives up meanwhile should stop the generation just as one that leaves a stream does.
    with RawUpstream(hang) as upstream:
        proxy = start_proxy(upstream.url, read_timeout=5.0)
        with httpx.Client(base_url=proxy.url, timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=chat_body(False))

        assert upstream.closed.wait(2.0), "the upstream kept working for a client that had left"


# An upstream that breaks mid-response -------------------------------------------------------------


def test_sse_cut_between_events_ends_with_an_error_event(start_proxy: StartProxy) -> None:
    with RawUpstream(cut_sse(EVENTS[:4])) as upstream:  # role and three words, then the connection closes
        proxy = start_proxy(upstream.url)
        raw = proxy.sdk().chat.completions.with_raw_response.create(
            model=MODEL, messages=user(ON), stream=True
        )
        parts: list[str] = []
        with pytest.raises(openai.APIError) as raised:
            for chunk in raw.parse():
                parts.append(chunk.choices[0].delta.content or "")

    assert raw.http_response.status_code == 200
    assert "".join(parts) == " ".join(WORDS[:3])
    assert "broke off mid-response" in raised.value.message
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["type"] == "upstream_error"
    record = proxy.record(raw.headers["x-guardrail-id"])
    assert "broke off mid-response" in record["upstream"]["error"]
    assert record["upstream"]["status"] == 200
    assert record["reply"] == " ".join(WORDS[:3])
    assert proxy.metric("guardrail_upstream_errors_total", kind="broken") == 1


def test_sse_cut_inside_an_event_ends_with_an_error_event(start_proxy: StartProxy) -> None:
    with RawUpstream(cut_sse(EVENTS[:4], tail=EVENTS[4][:30])) as upstream:
        proxy = start_proxy(upstream.url)
        stream = proxy.sdk().chat.completions.create(model=MODEL, messages=user(ON), stream=True)

        with pytest.raises(openai.APIError, match="broke off mid-response"):
            for _ in stream:
                pass


def test_a_passthrough_stream_cut_midway_ends_with_an_error_event_and_is_counted(
    start_proxy: StartProxy,
) -> None:
    with RawUpstream(cut_sse(EVENTS[:2])) as upstream:
        proxy = start_proxy(upstream.url)
        with proxy.http().stream("POST", "/v1/responses", json={"stream": True}) as response:
            received = b"".join(response.iter_raw())
        broken = proxy.metric("guardrail_upstream_errors_total", kind="broken")

    assert received.startswith(EVENTS[0] + EVENTS[1])
    assert b"broke off mid-response" in received[len(EVENTS[0] + EVENTS[1]) :]
    assert broken == 1


def test_json_cut_midway_is_an_incomplete_response(start_proxy: StartProxy) -> None:
    body = orjson.dumps(
        {"id": "chatcmpl-x", "object": "chat.completion", "choices": [], "usage": UPSTREAM_USAGE}
    )
    with RawUpstream(cut_json(body, 40)) as upstream:
        proxy = start_proxy(upstream.url)
        received = b""
        with (
            proxy.http().stream("POST", "/v1/chat/completions", json=chat_body(False)) as response,
            pytest.raises(httpx.RemoteProtocolError),
        ):
            for part in response.iter_raw():
                received += part
        with pytest.raises(openai.APIConnectionError):
            proxy.sdk().chat.completions.create(model=MODEL, messages=user(ON))

    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(body))
    assert received == body[:40]
    record = proxy.record(response.headers["x-guardrail-id"])
    assert "broke off mid-response" in record["upstream"]["error"]
    assert record["reply"] is None
    assert record["upstream"]["usage"] is None


def test_upstream_stalling_after_the_headers_ends_the_stream_with_an_error(start_proxy: StartProxy) -> None:
    with RawUpstream(stall_after_headers) as upstream:
        proxy = start_proxy(upstream.url, read_timeout=0.5)
        started = time.monotonic()
        raw = proxy.sdk().chat.completions.with_raw_response.create(
            model=MODEL, messages=user(ON), stream=True
        )
        with pytest.raises(openai.APIError, match="ReadTimeout"):
            list(raw.parse())
        elapsed = time.monotonic() - started

    assert raw.headers["x-guardrail-verdict"] == "passed"
    assert 0.45 < elapsed < 2.0
    assert "ReadTimeout" in proxy.record(raw.headers["x-guardrail-id"])["upstream"]["error"]


def test_a_client_leaving_right_after_done_is_no_error(start_proxy: StartProxy) -> None:
    # The SDK closes the connection once it has read "[DONE]"; the upstream ends its chunked body
    # a moment later. The reply reached the client whole.
    async def late_end(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(sse_head() + b"".join(http_chunk(event) for event in EVENTS))
        await writer.drain()
        if not await upstream.wait_for_eof(reader, timeout=0.5):
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    with RawUpstream(late_end) as upstream:
        proxy = start_proxy(upstream.url)
        raw = proxy.sdk().chat.completions.with_raw_response.create(
            model=MODEL, messages=user(ON), stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        raw.http_response.close()
        record = proxy.record(raw.headers["x-guardrail-id"])

    assert text == UPSTREAM_REPLY
    assert record["upstream"]["error"] is None
    assert record["reply"] == UPSTREAM_REPLY


# Response headers ---------------------------------------------------------------------------------


def test_a_relayed_response_has_one_date_and_one_server_header(proxy: ProxyServer) -> None:
    # The fake upstream runs on uvicorn too: each server writes its own Date and Server.
    passed = proxy.http().post("/v1/chat/completions", json={"messages": [{"role": "user", "content": ON}]})
    passed_through = proxy.http().get("/v1/models")
    refused = proxy.http().post("/v1/chat/completions", json={"messages": [{"role": "user", "content": OFF}]})

    assert passed.headers["x-guardrail-verdict"] == "passed"
    assert refused.headers["x-guardrail-verdict"] == "blocked"
    for response in (passed, passed_through, refused):
        assert response.status_code == 200
        assert len(response.headers.get_list("date")) == 1
        assert response.headers.get_list("server") == ["uvicorn"]


async def _hop_by_hop(
    upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    body = b'{"object": "list", "data": []}'
    writer.write(
        b"HTTP/1.1 200 OK\r\n"
        b"content-type: application/json\r\n"
        b"connection: keep-alive, x-hop\r\n"
        b"keep-alive: timeout=5\r\n"
        b"x-hop: for the proxy only\r\n"
        b"set-cookie: a=1\r\n"
        b"set-cookie: b=2\r\n"
        b"x-end-to-end: kept\r\n" + f"content-length: {len(body)}\r\n\r\n".encode() + body
    )
    await writer.drain()
    await upstream.wait_for_eof(reader, timeout=5)


def test_the_proxys_verdict_headers_replace_the_upstreams(start_proxy: StartProxy) -> None:
    async def spoofing(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        body = orjson.dumps(
            {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
            }
        )
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"x-guardrail-verdict: spoofed\r\nx-guardrail-layer: elsewhere\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await upstream.wait_for_eof(reader, timeout=5)

    with RawUpstream(spoofing) as upstream:
        proxy = start_proxy(upstream.url)
        response = proxy.http().post("/v1/chat/completions", json=chat_body(False))

    assert response.headers.get_list("x-guardrail-verdict") == ["passed"]
    assert response.headers.get_list("x-guardrail-layer") == ["similarity"]


def test_a_304_with_a_content_length_keeps_the_connection(start_proxy: StartProxy) -> None:
    # Its Content-Length is the size of what the client has cached (RFC 9110, 8.6); no body follows.
    async def not_modified(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:  # the proxy may send the next request on the same connection
            writer.write(b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\ncontent-length: 1234\r\n\r\n')
            await writer.drain()
            try:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            except (asyncio.IncompleteReadError, TimeoutError):
                return

    with RawUpstream(not_modified) as upstream:
        proxy = start_proxy(upstream.url)
        host, port = proxy.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as client:
            answers = []
            for _ in range(2):  # the second request on the same connection
                client.sendall(b'GET /v1/models HTTP/1.1\r\nhost: x\r\nif-none-match: "v1"\r\n\r\n')
                answers.append(client.recv(65536))

    assert all(answer.startswith(b"HTTP/1.1 304 ") for answer in answers)
    assert all(b'etag: "v1"' in answer for answer in answers)


def test_expect_100_continue_is_answered_here_not_forwarded(start_proxy: StartProxy) -> None:
    # An upstream need not send 100 Continue (RFC 9110, 10.1.1); forwarded, Expect made the proxy
    # hold the body for it while the upstream waited for the body.
    async def no_continue(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        body = b'{"object": "list", "data": []}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        writer.write(f"content-length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        await upstream.wait_for_eof(reader, timeout=5)

    with RawUpstream(no_continue) as upstream:
        proxy = start_proxy(upstream.url, read_timeout=10.0)
        with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
            response = client.post(
                "/v1/embeddings", content=b'{"input": "x"}', headers={"expect": "100-continue"}
            )

    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": []}
    assert upstream.requests[0].body == b'{"input": "x"}'
    assert "expect" not in dict(upstream.requests[0].headers)


def test_response_hop_by_hop_headers_stay_at_the_proxy(start_proxy: StartProxy) -> None:
    with RawUpstream(_hop_by_hop) as upstream:
        proxy = start_proxy(upstream.url)
        response = proxy.http().get("/v1/models")

    assert response.json() == {"object": "list", "data": []}
    assert response.headers["x-end-to-end"] == "kept"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert "x-hop" not in response.headers
    assert "keep-alive" not in response.headers
