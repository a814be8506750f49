"""The proxy end to end: a real uvicorn server, the official OpenAI SDK as the client, real upstreams."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import openai
import orjson
import pydantic
import pytest

from guardrail.guard import Guard
from guardrail.proxy import create_app
from guardrail.settings import DEFAULT_REFUSAL, Settings
from guardrail.upstream import Upstream, UpstreamCheck

from samples import OFF_TOPIC, ON_TOPIC
from upstreams import (
    API_KEY,
    UPSTREAM_ERROR,
    UPSTREAM_REPLY,
    UPSTREAM_USAGE,
    FakeOpenAI,
    ProxyServer,
    RawUpstream,
    closed_port,
    hang,
)

MODEL = "gpt-test"
ON = ON_TOPIC[0]
OFF = OFF_TOPIC[2]
FOLLOW_UP = "and the second one?"  # content-free: off topic alone, on topic after an on-topic question
ERROR_KEYS = {"message", "type", "param", "code"}

StartProxy = Callable[..., ProxyServer]


def user(text: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def guard_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("x-guardrail-")}


# Blocked requests are answered by the proxy -------------------------------------------------------


def test_blocked_request_gets_the_refusal_and_never_reaches_the_upstream(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, guard: Guard
) -> None:
    raw = proxy.sdk().chat.completions.with_raw_response.create(model=MODEL, messages=user(OFF))
    completion = raw.parse()

    assert raw.http_response.status_code == 200
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == DEFAULT_REFUSAL
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == MODEL
    headers = raw.headers
    assert headers["x-guardrail-verdict"] == "blocked"
    assert headers["x-guardrail-layer"] == "similarity"
    assert float(headers["x-guardrail-score"]) < guard.threshold
    assert unquote(headers["x-guardrail-scenario"]) == guard.judge(OFF).scenario
    assert headers["x-guardrail-id"].startswith("gr-")
    assert completion.id == f"chatcmpl-{headers['x-guardrail-id']}"
    assert fake_upstream.requests == []


def test_blocked_request_gets_a_custom_refusal(start_proxy: StartProxy, fake_upstream: FakeOpenAI) -> None:
    refusal = "I can only help with buying, selling and renting homes."
    proxy = start_proxy(fake_upstream.url, refusal=refusal)

    completion = proxy.sdk().chat.completions.create(model=MODEL, messages=user(OFF))

    assert completion.choices[0].message.content == refusal
    assert fake_upstream.requests == []


class Listing(pydantic.BaseModel):
    address: str
    available: bool


def test_a_blocked_structured_output_request_gets_the_refusal_as_a_refusal(
    proxy: ProxyServer, fake_upstream: FakeOpenAI
) -> None:
    # Refusal text in ``content`` would fail the schema, and the SDK's parse() would raise.
    completion = proxy.sdk().chat.completions.parse(model=MODEL, messages=user(OFF), response_format=Listing)

    message = completion.choices[0].message
    assert message.parsed is None
    assert message.content is None
    assert message.refusal == DEFAULT_REFUSAL
    assert fake_upstream.requests == []


def test_a_blocked_structured_output_stream_refuses_as_a_refusal(
    proxy: ProxyServer, fake_upstream: FakeOpenAI
) -> None:
    sdk = proxy.sdk()
    with sdk.chat.completions.stream(model=MODEL, messages=user(OFF), response_format=Listing) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()

    assert "refusal.done" in kinds and "content.done" not in kinds
    assert final.choices[0].message.refusal == DEFAULT_REFUSAL
    assert final.choices[0].message.parsed is None
    assert fake_upstream.requests == []


@pytest.mark.parametrize("include_usage", [True, False])
def test_blocked_stream_is_a_valid_chunk_stream(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, include_usage: bool
) -> None:
    raw = proxy.sdk().chat.completions.with_raw_response.create(
        model=MODEL,
        messages=user(OFF),
        stream=True,
        stream_options={"include_usage": include_usage},
    )
    chunks = list(raw.parse())

    assert raw.headers["x-guardrail-verdict"] == "blocked"
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == DEFAULT_REFUSAL
    assert with_choices[-1].choices[0].finish_reason == "stop"
    usage = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert chunks[-1].choices == []
        assert usage == [chunks[-1].usage]
        assert usage[0].total_tokens == 0
    else:
        assert usage == []
    assert fake_upstream.requests == []


# Passed requests go upstream unchanged ------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_passed_request_reaches_the_upstream_unchanged(
    start_proxy: StartProxy, fake_upstream: FakeOpenAI, stream: bool
) -> None:
    # Layer 2 off: the request goes as it came (tests/test_layer2.py covers the instruction).
    proxy = start_proxy(fake_upstream.url, instruction=False)
    body: dict[str, Any] = {"model": MODEL, "messages": user(ON), "temperature": 0.2}
    if stream:
        body["stream"] = True
    raw = proxy.sdk().chat.completions.with_raw_response.create(
        **body, extra_headers={"x-custom": "kept as sent"}
    )
    if stream:
        reply = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        reply = raw.parse().choices[0].message.content or ""

    assert reply == UPSTREAM_REPLY
    assert raw.headers["x-guardrail-verdict"] == "passed"
    assert raw.headers["x-request-id"] == "req-chat-1"  # the upstream's own headers come back
    [arrived] = fake_upstream.requests
    assert (arrived.method, arrived.path) == ("POST", "/v1/chat/completions")
    assert arrived.json() == body
    assert arrived.header("authorization") == f"Bearer {API_KEY}"
    assert arrived.header("x-custom") == "kept as sent"
    assert arrived.header("host") == fake_upstream.url.removeprefix("http://")


def test_passed_request_body_arrives_byte_identical(
    start_proxy: StartProxy, fake_upstream: FakeOpenAI
) -> None:
    # Odd spacing, key order and escapes: with layer 2 off, the proxy must send what it read, not a
    # re-serialisation.
    proxy = start_proxy(fake_upstream.url, instruction=False)
    body = b'{ "messages" : [{"role":"user", "content":"Is the two-bedroom flat on Station Road \\u0073till available to rent?"}],\n"model":"m" }'  # noqa: E501
    response = proxy.http().post("/v1/chat/completions", content=body, headers={"content-type": "x/y"})

    assert response.status_code == 200
    assert response.headers["x-guardrail-verdict"] == "passed"
    [arrived] = fake_upstream.requests
    assert arrived.body == body
    assert arrived.header("content-type") == "x/y"
    assert arrived.header("content-length") == str(len(body))


def test_request_hop_by_hop_headers_stay_at_the_proxy(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    headers = {
        "connection": "keep-alive, x-private",
        "x-private": "for the proxy only",
        "proxy-authorization": "Basic c2VjcmV0",
        "x-public": "for the upstream",
    }
    proxy.http().get("/v1/models", headers=headers)

    [arrived] = fake_upstream.requests
    names = {name for name, _ in arrived.headers}
    assert "x-private" not in names
    assert "proxy-authorization" not in names
    assert arrived.header("x-public") == "for the upstream"


# Everything else passes through -------------------------------------------------------------------


def test_models_pass_through_via_the_sdk(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    models = proxy.sdk().models.list()

    assert [m.id for m in models.data] == ["gpt-test"]
    [arrived] = fake_upstream.requests
    assert (arrived.method, arrived.path) == ("GET", "/v1/models")
    assert arrived.header("authorization") == f"Bearer {API_KEY}"
    assert proxy.records() == []  # only chat completions are guarded and logged


def test_query_string_arrives_as_sent(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    query = "purpose=fine-tune&after=file%2Fabc%20d&limit=2&flag"
    response = proxy.http().get(f"/v1/files?{query}")

    assert response.status_code == 200
    [arrived] = fake_upstream.requests
    assert (arrived.method, arrived.path, arrived.query) == ("GET", "/v1/files", query)
    assert "x-guardrail-verdict" not in response.headers


def test_embeddings_body_arrives_byte_identical(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    body = b'{"input":  ["hello",\n "caf\xc3\xa9"], "model": "text-embedding-3-small"}'
    response = proxy.http().post("/v1/embeddings", content=body, headers={"content-type": "application/json"})

    assert response.json()["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    [arrived] = fake_upstream.requests
    assert (arrived.method, arrived.path, arrived.body) == ("POST", "/v1/embeddings", body)


def test_embeddings_via_the_sdk(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    result = proxy.sdk().embeddings.create(input="hello", model="e", encoding_format="float")

    assert result.data[0].embedding == [0.1, 0.2, 0.3]
    assert fake_upstream.requests[0].json() == {"input": "hello", "model": "e", "encoding_format": "float"}


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_pass_through(proxy: ProxyServer, fake_upstream: FakeOpenAI, method: str) -> None:
    content = b"payload" if method in ("PUT", "PATCH") else None
    response = proxy.http().request(method, "/v1/files/file-1", content=content)

    assert response.status_code == 200
    assert response.json()["method"] == method
    [arrived] = fake_upstream.requests
    assert (arrived.method, arrived.path, arrived.body) == (method, "/v1/files/file-1", content or b"")


def test_get_on_the_chat_path_passes_through_unguarded(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    # GET /v1/chat/completions lists stored completions: nothing to judge.
    response = proxy.http().get("/v1/chat/completions?limit=1")

    assert response.status_code == 200
    assert "x-guardrail-verdict" not in response.headers
    assert fake_upstream.requests[0].method == "GET"


@pytest.mark.parametrize("status", [201, 404, 418, 429])
def test_upstream_status_and_headers_come_back(proxy: ProxyServer, status: int) -> None:
    response = proxy.http().get(f"/v1/echo?status={status}")

    assert response.status_code == status
    assert response.headers["x-upstream-header"] == "kept"
    assert response.headers["x-request-id"] == "req-echo-1"
    assert response.json()["query"] == f"status={status}"


def test_gzip_upstream_body_passes_through_decodable(proxy: ProxyServer) -> None:
    with proxy.http().stream("GET", "/v1/gzip", headers={"accept-encoding": "gzip"}) as response:
        raw = b"".join(response.iter_raw())

    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(raw)
    assert orjson.loads(gzip.decompress(raw))["items"] == list(range(200))
    assert proxy.http().get("/v1/gzip").json()["compressed"] is True  # httpx decodes it itself


def test_passthrough_does_not_ask_for_an_encoding_the_client_did_not(
    proxy: ProxyServer, fake_upstream: FakeOpenAI
) -> None:
    # A client that sends no Accept-Encoding (curl without --compressed) must not get gzip back.
    with httpx.Client(base_url=proxy.url) as client:
        request = client.build_request("GET", "/v1/files")
        del request.headers["accept-encoding"]
        client.send(request)

    [arrived] = fake_upstream.requests
    assert arrived.header("accept-encoding") in (None, "identity")


@pytest.mark.parametrize("path", ["/v1/./chat/completions", "/v1/models/../chat/completions"])
def test_dot_segments_do_not_bypass_the_guard(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, path: str
) -> None:
    # http.client sends the path as written; httpx and browsers would normalise it first.
    host, port = proxy.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    body = orjson.dumps({"model": MODEL, "messages": user(OFF)})
    connection.request("POST", path, body, {"content-type": "application/json"})
    response = connection.getresponse()
    response.read()
    connection.close()

    assert fake_upstream.chats == [], f"{path} reached the upstream's chat completions unjudged"


@pytest.mark.parametrize(
    "path",
    ["/v1/chat/completions/", "/v1/chat/completions;x=1", "/V1/Chat/Completions", "/chat/completions//"],
)
def test_near_spellings_of_the_chat_path_are_judged(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, path: str
) -> None:
    # Routers that ignore case, a trailing slash or ;parameters would serve these as chat completions.
    off = proxy.http().post(path, json={"model": MODEL, "messages": user(OFF)})
    on = proxy.http().post(path, json={"model": MODEL, "messages": user(ON)})

    assert off.headers["x-guardrail-verdict"] == "blocked"
    assert on.headers["x-guardrail-verdict"] == "passed"
    [arrived] = fake_upstream.requests  # the passed one, at the path it was sent to
    assert arrived.path == path


def test_healthz_answers_here(proxy: ProxyServer, fake_upstream: FakeOpenAI, guard: Guard) -> None:
    response = proxy.http().get("/healthz")

    assert response.json() == {"status": "ok", "scenario": guard.document.name}
    assert fake_upstream.requests == []


# Readiness ------------------------------------------------------------------------------------------


def test_readyz_is_ready_with_a_reachable_upstream(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, guard: Guard
) -> None:
    response = proxy.http().get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "scenario": guard.document.name,
        "classifier": None,
        "upstream": fake_upstream.url.removeprefix("http://"),
    }
    assert fake_upstream.requests == []  # a connection, not a request


def test_readyz_is_ready_while_the_configured_classifier_does_not_exist_yet(
    start_proxy: StartProxy, fake_upstream: FakeOpenAI, tmp_path: Path
) -> None:
    proxy = start_proxy(fake_upstream.url, classifier=tmp_path / "later.onnx")
    assert proxy.http().get("/readyz").json()["status"] == "ready"


def test_readyz_is_503_when_the_upstream_cannot_be_reached(start_proxy: StartProxy) -> None:
    port = closed_port()
    proxy = start_proxy(f"http://127.0.0.1:{port}")

    response = proxy.http().get("/readyz")

    assert response.status_code == 503
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    assert error["type"] == "upstream_error"
    assert error["message"].startswith(f"not ready: the upstream (127.0.0.1:{port}) cannot be reached: ")
    assert response.headers["retry-after"] == "5"
    assert proxy.http().get("/healthz").status_code == 200  # alive all the same


def test_readyz_keeps_its_answer_for_a_few_seconds(start_proxy: StartProxy) -> None:
    port = closed_port()
    proxy = start_proxy(f"http://127.0.0.1:{port}")
    assert proxy.http().get("/readyz").status_code == 503
    with socket.create_server(("127.0.0.1", port)):
        # Up now, but the probe is answered from the last check (a fresh one: see the next tests).
        assert proxy.http().get("/readyz").status_code == 503


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_upstream_check_connects_once_per_ttl_and_shares_a_check() -> None:
    connections = 0

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clock = Clock()
        check = UpstreamCheck("127.0.0.1", port, ttl=5.0, clock=clock)
        async with server:
            assert await check.problem() is None
            clock.now += 4.9
            assert await check.problem() is None
            await asyncio.sleep(0.05)
            assert connections == 1
            clock.now += 0.1  # stale now: concurrent probes share one new check
            assert await asyncio.gather(*(check.problem() for _ in range(5))) == [None] * 5
            await asyncio.sleep(0.05)
            assert connections == 2
        clock.now += 5
        problem = await check.problem()  # the server is gone
        assert problem is not None and problem.startswith(
            f"the upstream (127.0.0.1:{port}) cannot be reached"
        )

    asyncio.run(main())


def test_upstream_check_gives_up_after_its_timeout() -> None:
    async def main() -> str | None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            return await UpstreamCheck("127.0.0.1", port, timeout=0).problem()

    problem = asyncio.run(main())
    assert problem is not None and "did not accept a connection within 0 s" in problem


def test_upstream_check_goes_where_the_pool_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert UpstreamCheck.of(Upstream("https://api.example.com/v1")).address == "api.example.com:443"
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    assert UpstreamCheck.of(Upstream("https://api.example.com/v1")).address == "proxy.internal:3128"
    assert UpstreamCheck.of(Upstream("https://api.example.com", trust_env=False)).address == (
        "api.example.com:443"
    )


# Upstream failures ----------------------------------------------------------------------------------


def test_upstream_error_is_passed_on(proxy: ProxyServer, fake_upstream: FakeOpenAI) -> None:
    fake_upstream.fail = 500

    with pytest.raises(openai.InternalServerError) as raised:
        proxy.sdk().chat.completions.create(model=MODEL, messages=user(ON))

    assert raised.value.status_code == 500
    assert raised.value.body == UPSTREAM_ERROR["error"]
    assert UPSTREAM_ERROR["error"]["message"] in raised.value.message
    assert raised.value.response.headers["x-guardrail-verdict"] == "passed"
    assert len(fake_upstream.chats) == 1


def test_upstream_down_is_a_502_with_an_openai_error(start_proxy: StartProxy) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{closed_port()}")

    response = proxy.http().post("/v1/chat/completions", json={"model": MODEL, "messages": user(ON)})

    assert response.status_code == 502
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    assert error["type"] == "upstream_error"
    assert "cannot be reached" in error["message"]
    assert "Traceback" not in response.text
    assert response.headers["x-guardrail-verdict"] == "passed"
    assert set(guard_headers(response.headers)) == {
        "x-guardrail-id",
        "x-guardrail-verdict",
        "x-guardrail-layer",
        "x-guardrail-score",
        "x-guardrail-scenario",
    }
    record = proxy.record(response.headers["x-guardrail-id"])
    assert record["upstream"]["status"] == 502
    assert record["upstream"]["error"]
    assert proxy.metric("guardrail_upstream_errors_total", kind="unreachable") == 1
    # The SDK reads the same body.
    with pytest.raises(openai.APIStatusError) as raised:
        proxy.sdk().chat.completions.create(model=MODEL, messages=user(ON))
    assert raised.value.status_code == 502


def test_upstream_down_on_a_passthrough_path_is_a_502(start_proxy: StartProxy) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{closed_port()}")

    response = proxy.http().get("/v1/models")

    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"
    assert guard_headers(response.headers) == {}


def test_upstream_that_never_answers_is_a_504_after_the_read_timeout(start_proxy: StartProxy) -> None:
    with RawUpstream(hang) as upstream:
        proxy = start_proxy(upstream.url, read_timeout=0.5)
        started = time.monotonic()
        response = proxy.http().post("/v1/chat/completions", json={"model": MODEL, "messages": user(ON)})
        elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert 0.45 < elapsed < 2.0
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert "did not answer in time" in error["message"]
    assert "Traceback" not in response.text
    assert response.headers["x-guardrail-verdict"] == "passed"
    assert len(upstream.requests) == 1
    assert proxy.metric("guardrail_upstream_errors_total", kind="timeout") == 1


# Bad requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "the request body is empty"),
        (b'{"model": "m", "messages": [', "the request body is not valid JSON"),
        (b'[{"role": "user", "content": "hi"}]', "the request body must be a JSON object"),
        (b'{"model": "m"}', "'messages' must be a non-empty array"),
        (b'{"model": "m", "messages": []}', "'messages' must be a non-empty array"),
        (b'{"messages": ["hi"]}', "'messages[0]' must be an object"),
        (b'{"messages": [{"role": "user", "content": 42}]}', "'messages[0].content' must be a string"),
        (b'{"messages": [{"role": "user", "content": {"text": "hi"}}]}', "must be a string or an array"),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}',
            "has no string 'text'",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "'stream' must be true"),
    ],
)
def test_malformed_request_is_a_400_that_says_why(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, body: bytes, message: str
) -> None:
    response = proxy.http().post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert fake_upstream.requests == []
    assert proxy.metric("guardrail_rejected_requests_total", reason="malformed") == 1


def test_malformed_request_raises_bad_request_in_the_sdk(proxy: ProxyServer) -> None:
    messages: Any = [{"role": "user", "content": 42}]

    with pytest.raises(openai.BadRequestError, match="must be a string or an array"):
        proxy.sdk().chat.completions.create(model=MODEL, messages=messages)


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_a_413(
    start_proxy: StartProxy, fake_upstream: FakeOpenAI, chunked: bool
) -> None:
    proxy = start_proxy(fake_upstream.url, max_body_bytes=1000)
    body = orjson.dumps({"model": MODEL, "messages": user(ON + " " * 2000)})

    content = _chunks(body, 300) if chunked else body
    response = proxy.http().post("/v1/chat/completions", content=content)

    assert ("content-length" in response.request.headers) is not chunked
    assert response.status_code == 413
    assert "1000 bytes" in response.json()["error"]["message"]
    assert fake_upstream.requests == []
    assert proxy.metric("guardrail_rejected_requests_total", reason="too_large") == 1
    # Just under the limit is judged and passed.
    small = orjson.dumps({"model": MODEL, "messages": user(ON)})
    assert proxy.http().post("/v1/chat/completions", content=_chunks(small, 50)).status_code == 200


def test_passthrough_body_over_the_limit_with_content_length_is_a_413(
    start_proxy: StartProxy, fake_upstream: FakeOpenAI
) -> None:
    proxy = start_proxy(fake_upstream.url, max_body_bytes=1000)

    response = proxy.http().post("/v1/files", content=b"x" * 2000)

    assert response.status_code == 413
    assert fake_upstream.requests == []


def test_passthrough_chunked_body_over_the_limit_is_a_413(
    start_proxy: StartProxy, fake_upstream: FakeOpenAI
) -> None:
    proxy = start_proxy(fake_upstream.url, max_body_bytes=1000)

    response = proxy.http().post("/v1/files", content=_chunks(b"x" * 5000, 500))

    assert response.status_code == 413
    assert fake_upstream.requests == []


def test_a_passthrough_upload_that_stalls_is_a_408_and_frees_the_upstream_connection(
    start_proxy: StartProxy,
) -> None:
    # A bare upstream that records what arrives and when its client hangs up; it never answers.
    listener = socket.create_server(("127.0.0.1", 0))
    received = bytearray()
    hung_up = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(30)
            while chunk := connection.recv(65536):
                received.extend(chunk)
        hung_up.set()

    threading.Thread(target=serve, daemon=True).start()
    upstream = f"http://127.0.0.1:{listener.getsockname()[1]}"
    proxy = start_proxy(upstream, read_timeout=1.0)
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(
            b"POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n"
            b"content-length: 100\r\n\r\n0123456789"
        )
        started = time.monotonic()
        answer = client.recv(65536)
        waited = time.monotonic() - started

    listener.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"stopped arriving" in answer
    assert waited < 5.0
    assert hung_up.wait(5.0), "the upstream connection was kept for a stalled upload"
    assert received.endswith(b"0123456789")  # what did arrive was streamed on
    assert proxy.metric("guardrail_rejected_requests_total", reason="stalled") == 1


def test_request_without_user_text_passes_unjudged_and_is_counted(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, guard: Guard
) -> None:
    messages: Any = [{"role": "system", "content": "You are a helpful assistant for a real estate agency."}]
    before = proxy.metric("guardrail_requests_total", verdict="unjudged")

    raw = proxy.sdk().chat.completions.with_raw_response.create(model=MODEL, messages=messages)

    assert raw.parse().choices[0].message.content == UPSTREAM_REPLY
    assert raw.headers["x-guardrail-verdict"] == "unjudged"
    assert raw.headers["x-guardrail-layer"] == "none"
    assert len(fake_upstream.chats) == 1
    labels = {"verdict": "unjudged", "layer": "none", "scenario": guard.document.name}
    assert before == 0
    assert proxy.metric("guardrail_requests_total", **labels) == 1
    record = proxy.record(raw.headers["x-guardrail-id"])
    assert (record["verdict"], record["text"], record["score"]) == ("unjudged", None, None)


# What is judged -----------------------------------------------------------------------------------


def test_text_parts_are_joined_and_images_ignored(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, guard: Guard
) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    on_parts = [
        {"type": "text", "text": "Is the two-bedroom flat on Station Road"},
        image,
        {"type": "text", "text": "still available to rent?"},
    ]
    joined = "Is the two-bedroom flat on Station Road\nstill available to rent?"
    assert guard.judge(joined).allowed
    client = proxy.sdk()

    blocked = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user([{"type": "text", "text": OFF}, image])
    )
    passed = client.chat.completions.with_raw_response.create(model=MODEL, messages=user(on_parts))

    assert blocked.headers["x-guardrail-verdict"] == "blocked"
    assert blocked.parse().choices[0].message.content == DEFAULT_REFUSAL
    assert passed.headers["x-guardrail-verdict"] == "passed"
    assert proxy.record(passed.headers["x-guardrail-id"])["text"] == joined
    [arrived] = fake_upstream.chats
    assert arrived.json()["messages"][-1]["content"] == on_parts  # the image still goes upstream


def test_follow_up_after_an_on_topic_question_passes_with_context(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, guard: Guard
) -> None:
    assert not guard.judge(FOLLOW_UP).allowed  # alone, it is blocked
    messages: Any = [
        {"role": "system", "content": "You are the agency's assistant."},
        {"role": "user", "content": ON},
        {"role": "assistant", "content": "Yes, and there is a second flat on the same road."},
        {"role": "user", "content": FOLLOW_UP},
    ]

    raw = proxy.sdk().chat.completions.with_raw_response.create(model=MODEL, messages=messages)

    assert raw.headers["x-guardrail-verdict"] == "passed"
    assert raw.parse().choices[0].message.content == UPSTREAM_REPLY
    record = proxy.record(raw.headers["x-guardrail-id"])
    assert (record["text"], record["context"]) == (FOLLOW_UP, ON)
    assert record["used_context"] is True
    assert record["followup"] is True


def test_follow_up_after_an_off_topic_question_stays_blocked(
    proxy: ProxyServer, fake_upstream: FakeOpenAI
) -> None:
    messages: Any = [
        {"role": "user", "content": OFF},
        {"role": "assistant", "content": "Here are two recipes."},
        {"role": "user", "content": FOLLOW_UP},
    ]

    raw = proxy.sdk().chat.completions.with_raw_response.create(model=MODEL, messages=messages)

    assert raw.headers["x-guardrail-verdict"] == "blocked"
    assert fake_upstream.requests == []
    record = proxy.record(raw.headers["x-guardrail-id"])
    assert (record["context"], record["used_context"]) == (OFF, True)


# Shadow mode --------------------------------------------------------------------------------------


def test_shadow_mode_passes_what_it_would_block(
    start_proxy: StartProxy, fake_upstream: FakeOpenAI, guard: Guard
) -> None:
    proxy = start_proxy(fake_upstream.url, mode="shadow")

    raw = proxy.sdk().chat.completions.with_raw_response.create(model=MODEL, messages=user(OFF))

    assert raw.parse().choices[0].message.content == UPSTREAM_REPLY
    assert raw.headers["x-guardrail-verdict"] == "would-block"
    assert float(raw.headers["x-guardrail-score"]) < guard.threshold
    assert len(fake_upstream.chats) == 1
    record = proxy.record(raw.headers["x-guardrail-id"])
    assert (record["verdict"], record["mode"]) == ("would-block", "shadow")
    assert record["reply"] == UPSTREAM_REPLY
    assert proxy.metric("guardrail_requests_total", verdict="would-block") == 1
    assert proxy.metric("guardrail_requests_total", verdict="blocked") == 0


# The interaction log ------------------------------------------------------------------------------


def test_interaction_log_has_one_record_per_guarded_request(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, guard: Guard
) -> None:
    client = proxy.sdk()
    blocked = client.chat.completions.with_raw_response.create(model=MODEL, messages=user(OFF))
    passed = client.chat.completions.with_raw_response.create(model=MODEL, messages=user(ON))
    streamed = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(ON_TOPIC[1]), stream=True, stream_options={"include_usage": True}
    )
    list(streamed.parse())
    client.models.list()  # not guarded, not logged
    ids = [r.headers["x-guardrail-id"] for r in (blocked, passed, streamed)]

    proxy.stop()  # the lifespan's end flushes the log
    records = proxy.records()

    assert sorted(r["id"] for r in records) == sorted(ids)
    assert API_KEY not in str(proxy.settings.log_path and proxy.settings.log_path.read_text())
    by_id = {r["id"]: r for r in records}
    block, pas, stream = (by_id[i] for i in ids)
    for record in records:
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
        assert record["scenario"] == guard.document.name
        assert record["path"] == "/v1/chat/completions"
        assert record["model"] == MODEL
        assert record["layer"] == "similarity"
        assert record["threshold"] == pytest.approx(guard.threshold, abs=1e-6)
        assert record["nearest_scenario"] in guard.document.scenarios
        assert record["context"] is None
        latency = record["latency_ms"]
        assert 0 <= latency["guard"] <= latency["total"]
    assert (block["text"], block["reply"]) == (OFF, DEFAULT_REFUSAL)
    assert block["score"] < guard.threshold
    assert block["upstream"] == {"status": None, "usage": None, "error": None}
    assert block["latency_ms"]["upstream_first_byte"] is None
    assert (pas["text"], pas["reply"]) == (ON, UPSTREAM_REPLY)
    assert pas["score"] >= guard.threshold
    assert pas["upstream"] == {"status": 200, "usage": UPSTREAM_USAGE, "error": None}
    assert 0 < pas["latency_ms"]["upstream_first_byte"] <= pas["latency_ms"]["total"]
    assert (stream["text"], stream["stream"], stream["verdict"]) == (ON_TOPIC[1], True, "passed")
    assert stream["reply"] == UPSTREAM_REPLY  # the joined deltas
    assert stream["upstream"] == {"status": 200, "usage": UPSTREAM_USAGE, "error": None}


# Upstream URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "path", "query", "expected"),
    [
        ("http://h:1", "/v1/models", "", "http://h:1/v1/models"),
        ("http://h:1/", "/v1/models", "", "http://h:1/v1/models"),
        ("http://h:1/v1", "/v1/models", "", "http://h:1/v1/models"),
        ("http://h:1/v1/", "/v1/models", "", "http://h:1/v1/models"),
        ("http://h:1/v1", "/chat/completions", "", "http://h:1/v1/chat/completions"),
        ("http://h:1/v1", "/v1beta/models", "", "http://h:1/v1/v1beta/models"),
        ("http://h:1/api", "/v1/x", "q=1", "http://h:1/api/v1/x?q=1"),
        ("https://h/api", "/api/v1/x", "a=%2F&b", "https://h/api/v1/x?a=%2F&b"),
    ],
)
def test_target_joins_the_upstream_and_the_path(
    guard: Guard, upstream: str, path: str, query: str, expected: str
) -> None:
    app = create_app(Settings(upstream=upstream, log_path=None), guard)

    assert app.state.proxy.upstream.target(path.encode(), query.encode()) == expected


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ("http://h:1/api/v1", "http://h:1/api/v1/chat/completions"),  # OpenRouter
        ("http://h:1/openai/v1", "http://h:1/openai/v1/chat/completions"),  # Groq
    ],
)
def test_target_with_an_upstream_ending_in_the_version(guard: Guard, upstream: str, expected: str) -> None:
    # The module docstring: "unless the upstream URL already ends with the path's first segments".
    app = create_app(Settings(upstream=upstream, log_path=None), guard)

    assert app.state.proxy.upstream.target(b"/v1/chat/completions", b"") == expected


@pytest.mark.parametrize(("prefix", "arrived"), [("/api", "/api/v1"), ("/v1", "/v1"), ("", "/v1")])
def test_upstream_prefix_through_the_server(
    start_proxy: StartProxy, fake_upstream: FakeOpenAI, prefix: str, arrived: str
) -> None:
    proxy = start_proxy(fake_upstream.url + prefix)

    proxy.sdk().chat.completions.create(model=MODEL, messages=user(ON))
    proxy.http().get("/v1/x?q=1")

    chat, other = fake_upstream.requests
    assert chat.path == f"{arrived}/chat/completions"
    assert (other.path, other.query) == (f"{arrived}/x", "q=1")


# Concurrency --------------------------------------------------------------------------------------

MORE_ON = [
    "Do you have any three-bedroom houses for sale near a good primary school?",
    "What is the notice period if I want to end my tenancy early?",
    "Is the apartment on Mill Lane furnished, and does it have parking?",
    "Who do I call about a leaking roof in the house I rent from you?",
    "How much stamp duty would I pay on a first home?",
    "Can an agent call me back about the offer I made on Friday?",
]
MORE_OFF = [
    "What is the capital of Australia?",
    "Write a short poem about autumn leaves",
    "How do I fix a flat bicycle tyre?",
    "Which planet is closest to the sun?",
    "Suggest a funny name for my goldfish",
    "Explain how a neural network learns",
]


def test_concurrent_requests_each_get_their_own_verdict(
    proxy: ProxyServer, fake_upstream: FakeOpenAI, guard: Guard
) -> None:
    messages = [m for pair in zip(ON_TOPIC + MORE_ON, OFF_TOPIC + MORE_OFF, strict=True) for m in pair]
    assert len(set(messages)) == 32

    async def ask_all() -> list[Any]:
        async with proxy.async_sdk() as client:
            return await asyncio.gather(
                *(
                    client.chat.completions.with_raw_response.create(model=MODEL, messages=user(m))
                    for m in messages
                )
            )

    responses = asyncio.run(ask_all())

    # Each message judged alone, outside the cache and the batcher.
    scores, _ = guard.similarity.score(guard.encoder.encode(messages))
    for message, response, score in zip(messages, responses, scores, strict=True):
        expected = "passed" if score >= guard.threshold else "blocked"
        assert response.headers["x-guardrail-verdict"] == expected, message
        assert float(response.headers["x-guardrail-score"]) == pytest.approx(float(score), abs=1e-3)
        content = response.parse().choices[0].message.content
        assert content == (UPSTREAM_REPLY if expected == "passed" else DEFAULT_REFUSAL)
    passed = [
        m for m, r in zip(messages, responses, strict=True) if r.headers["x-guardrail-verdict"] == "passed"
    ]
    assert sorted(r.json()["messages"][-1]["content"] for r in fake_upstream.chats) == sorted(passed)
    assert 0 < len(passed) < 32
    batcher = proxy.app.state.gate.batcher
    assert batcher.items == 32
    # 32 requests at once on 2 workers: the queue that forms while they are busy is judged in batches.
    assert batcher.batches < 32


class _BrokenGuard:
    """A guard whose encoder fails: what a corrupt model or a bug would look like from the proxy."""

    def __init__(self, guard: Guard) -> None:
        self.document = guard.document
        self.classifier = None

    def judge_many(self, queries: object) -> list[object]:
        raise RuntimeError("the encoder broke")


def test_a_failing_guard_answers_a_clean_500_and_never_calls_the_upstream(
    guard: Guard, fake_upstream: FakeOpenAI, tmp_path: Path
) -> None:
    settings = Settings(upstream=fake_upstream.url, log_path=tmp_path / "log.jsonl")
    with ProxyServer(_BrokenGuard(guard), settings) as proxy:  # type: ignore[arg-type]
        response = proxy.http().post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": ON_TOPIC[0]}]},
        )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert "could not judge" in error["message"] and "Traceback" not in response.text
    assert fake_upstream.requests == []


def test_cookies_an_upstream_sets_never_go_out_with_another_request(
    proxy: ProxyServer, fake_upstream: FakeOpenAI
) -> None:
    # A shared client with a cookie jar would send user A's session cookie with user B's request.
    first = proxy.http().get("/v1/echo", params={"set_cookie": "session=user-a-secret"})
    assert first.status_code == 200
    proxy.http().get("/v1/models")
    proxy.sdk().chat.completions.create(model="m", messages=[{"role": "user", "content": ON_TOPIC[0]}])
    later = fake_upstream.requests[1:]
    assert len(later) == 2
    for arrived in later:
        assert "user-a-secret" not in str(arrived.headers)
