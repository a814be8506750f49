from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from guardrail.protocols.base import BadRequest, Conversation
from guardrail.protocols.openai import (
    MAX_PARSED_BYTES,
    MAX_REPLY_CHARS,
    JSONReader,
    OpenAIChat,
    SSEReader,
    content_text,
    error_body,
)

REFUSAL = "I'm sorry, this question is off-topic. I cannot answer that."


def body(**payload: Any) -> bytes:
    return orjson.dumps(payload)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def parse(**payload: Any) -> Conversation:
    return OpenAIChat().parse(body(**payload))


def events(chunks: list[bytes]) -> list[bytes]:
    """The ``data:`` payloads of server-sent events, one per event."""
    stream = b"".join(chunks)
    assert stream.endswith(b"\n\n")
    out = []
    for event in stream.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: "), event
        out.append(event[len(b"data: ") :])
    return out


def chunk(content: str | None = None, index: int = 0, **extra: Any) -> bytes:
    delta = {} if content is None else {"content": content}
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": None}],
        **extra,
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
STREAM = (
    chunk("")
    + chunk("Hello")
    + chunk(", wörld")
    + chunk(" ✓")
    + b": keep-alive comment\n\n"
    + b'data: {"choices": [], "usage": '
    + orjson.dumps(USAGE)
    + b"}\n\n"
    + b"data: [DONE]\n\n"
)


# --- parse ---------------------------------------------------------------------------------------


def test_string_content() -> None:
    conversation = parse(model="gpt-x", messages=[user("Is the flat still available?")])
    assert conversation == Conversation(text="Is the flat still available?", model="gpt-x")


def test_text_parts_are_joined_and_images_ignored() -> None:
    content = [
        {"type": "text", "text": "Is this flat"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "still available?"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]
    assert parse(messages=[user(content)]).text == "Is this flat\nstill available?"


def test_image_only_message_has_no_text() -> None:
    content = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    assert parse(messages=[user(content)]).text is None


def test_last_user_message_and_the_previous_user_turn() -> None:
    messages = [
        {"role": "system", "content": "You are an estate agent's assistant."},
        user("Is the flat on Station Road available?"),
        {"role": "assistant", "content": "Yes, two of them are."},
        {"role": "tool", "tool_call_id": "call_1", "content": "listing 42"},
        user("Book me a viewing"),
        {"role": "assistant", "content": "For which one?"},
        {"role": "developer", "content": "Be brief."},
        user([{"type": "text", "text": "and the second one?"}]),
    ]
    conversation = parse(messages=messages)
    assert conversation.text == "and the second one?"
    assert conversation.previous == "Book me a viewing"


def test_last_message_need_not_be_the_users() -> None:
    messages = [user("first"), user("second"), {"role": "assistant", "content": "a reply"}]
    conversation = parse(messages=messages)
    assert (conversation.text, conversation.previous) == ("second", "first")


def test_a_user_role_in_another_case_is_the_users_turn() -> None:
    # An upstream that reads roles in any case would answer it as the user's question.
    messages = [{"role": "User", "content": "first"}, {"role": "USER", "content": "second"}]
    conversation = parse(messages=messages)
    assert (conversation.text, conversation.previous) == ("second", "first")


def test_one_user_turn_has_no_previous() -> None:
    conversation = parse(messages=[{"role": "system", "content": "hi"}, user("Can I rent it?")])
    assert (conversation.text, conversation.previous) == ("Can I rent it?", None)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "You are helpful."}],
        [{"role": "assistant", "content": "Hello!"}],
        [user(None)],
        [user("")],
        [user([])],
        [{"content": "no role"}],
    ],
)
def test_no_user_text(messages: list[dict[str, Any]]) -> None:
    conversation = parse(messages=messages)
    assert conversation.text is None
    assert conversation.previous is None


def test_whitespace_only_user_messages_are_skipped() -> None:
    messages = [user("Can I rent the flat?"), user("Is it furnished?"), user("  \n\t")]
    conversation = parse(messages=messages)
    assert conversation.text == "Is it furnished?"
    assert conversation.previous == "Can I rent the flat?"
    assert parse(messages=[user(" "), user([{"type": "text", "text": "\n"}])]).text is None


def test_model_stream_and_include_usage_are_read() -> None:
    conversation = parse(
        model="llama-3", stream=True, stream_options={"include_usage": True}, messages=[user("hi")]
    )
    assert conversation.model == "llama-3"
    assert conversation.stream is True
    assert conversation.include_usage is True


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": False}},
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        {"stream": True, "stream_options": None},
        {"stream": True, "stream_options": ["include_usage"]},
    ],
)
def test_include_usage_only_when_exactly_true(extra: dict[str, Any]) -> None:
    assert parse(messages=[user("hi")], **extra).include_usage is False


def test_defaults_when_fields_are_absent() -> None:
    conversation = parse(messages=[user("hi")])
    assert conversation.stream is False
    assert conversation.model is None


def test_a_model_that_is_not_a_string_is_ignored() -> None:
    assert parse(model=42, messages=[user("hi")]).model is None


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", "the request body is empty"),
        (b"  \n", "the request body is empty"),
        (b"not json", "the request body is not valid JSON"),
        (b'{"messages": [', "the request body is not valid JSON"),
        (b'{"messages": "caf\xe9"}', "the request body is not valid UTF-8 (byte 17)"),
        (b"[]", "the request body must be a JSON object"),
        (b'"hi"', "the request body must be a JSON object"),
        (b"null", "the request body must be a JSON object"),
        (b"{}", "'messages' must be a non-empty array"),
        (b'{"messages": []}', "'messages' must be a non-empty array"),
        (b'{"messages": "hi"}', "'messages' must be a non-empty array"),
        (b'{"messages": {"role": "user"}}', "'messages' must be a non-empty array"),
        (b'{"messages": [{"role": "user", "content": "hi"}, "hi"]}', "'messages[1]' must be an object"),
        (b'{"messages": [null]}', "'messages[0]' must be an object"),
        (
            b'{"messages": [{"role": "user", "content": 42}]}',
            "'messages[0].content' must be a string or an array of content parts",
        ),
        (
            b'{"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}',
            "'messages[0].content' must be a string or an array of content parts",
        ),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            "a text part of 'messages[0].content' has no string 'text'",
        ),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}',
            "a text part of 'messages[0].content' has no string 'text'",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "stream": "true"}',
            "'stream' must be true or false",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": 1}', "'stream' must be true or false"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "stream": null}',
            "'stream' must be true or false",
        ),
    ],
)
def test_malformed_requests_are_bad_requests(raw: bytes, words: str) -> None:
    with pytest.raises(BadRequest) as info:
        OpenAIChat().parse(raw)
    assert str(info.value).startswith(words)


def test_content_text_directly() -> None:
    assert content_text(None, "x") == ""
    assert content_text("hi", "x") == "hi"
    assert (
        content_text([{"type": "text", "text": "a"}, "stray", {"type": "text", "text": "b"}], "x") == "a\nb"
    )
    with pytest.raises(BadRequest, match="'where' must be a string"):
        content_text(3.5, "where")


# --- the refusal ---------------------------------------------------------------------------------


def test_refusal_is_a_valid_chat_completion() -> None:
    conversation = Conversation(text="tell me a joke", model="gpt-x")
    raw = OpenAIChat().refusal(conversation, REFUSAL, "gr-abc")
    completion = ChatCompletion.model_validate(orjson.loads(raw))
    assert completion.id == "chatcmpl-gr-abc"
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-x"
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.content == REFUSAL
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 0


def test_refusal_without_a_model_names_the_guard() -> None:
    raw = OpenAIChat().refusal(Conversation(text="x"), REFUSAL, "gr-1")
    assert ChatCompletion.model_validate(orjson.loads(raw)).model == "guardrail"


@pytest.mark.parametrize("include_usage", [False, True])
def test_refusal_stream_is_valid_chunks_ending_with_done(include_usage: bool) -> None:
    conversation = Conversation(text="x", stream=True, model="gpt-x", include_usage=include_usage)
    datas = events(list(OpenAIChat().refusal_stream(conversation, REFUSAL, "gr-abc")))
    assert datas[-1] == b"[DONE]"
    chunks = [ChatCompletionChunk.model_validate(orjson.loads(data)) for data in datas[:-1]]
    assert {c.id for c in chunks} == {"chatcmpl-gr-abc"}
    assert {c.model for c in chunks} == {"gpt-x"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    content = "".join(choice.delta.content or "" for c in chunks for choice in c.choices)
    assert content == REFUSAL
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [choice.finish_reason for c in chunks for choice in c.choices if choice.finish_reason]
    assert finishes == ["stop"]
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(with_usage) == 1
        assert with_usage[0] is chunks[-1]
        assert with_usage[0].choices == []
        assert with_usage[0].usage is not None
        assert with_usage[0].usage.total_tokens == 0
    else:
        assert with_usage == []


def test_refusal_stream_reads_back_through_the_sse_reader() -> None:
    conversation = Conversation(text="x", stream=True, include_usage=True)
    reader = SSEReader()
    for piece in OpenAIChat().refusal_stream(conversation, REFUSAL, "gr-1"):
        reader.feed(piece)
    reader.close()
    assert reader.text == REFUSAL
    assert reader.done
    assert reader.usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_a_structured_outputs_refusal_reads_back_through_both_readers() -> None:
    # An upstream refusing under Structured Outputs (and the proxy) puts the text in "refusal".
    schema = {"type": "json_schema", "json_schema": {"name": "listing", "schema": {"type": "object"}}}
    conversation = Conversation(text="x", payload={"messages": [], "response_format": schema})
    message = orjson.loads(OpenAIChat().refusal(conversation, REFUSAL, "gr-1"))["choices"][0]["message"]
    assert (message["content"], message["refusal"]) == (None, REFUSAL)

    whole = JSONReader()
    whole.feed(OpenAIChat().refusal(conversation, REFUSAL, "gr-1"))
    whole.close()
    streamed = SSEReader()
    for piece in OpenAIChat().refusal_stream(replace(conversation, stream=True), REFUSAL, "gr-1"):
        streamed.feed(piece)
    streamed.close()
    assert whole.text == streamed.text == REFUSAL


def test_error_body_is_openai_shaped() -> None:
    assert orjson.loads(error_body("bad", "invalid_request_error", 400)) == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": 400}
    }


def test_reader_kind_follows_stream() -> None:
    assert isinstance(OpenAIChat().reader(stream=True), SSEReader)
    assert isinstance(OpenAIChat().reader(stream=False), JSONReader)


# --- SSEReader -----------------------------------------------------------------------------------


def read_stream(pieces: list[bytes]) -> SSEReader:
    reader = SSEReader()
    for piece in pieces:
        reader.feed(piece)
    reader.close()
    return reader


def test_sse_reader_whole_stream() -> None:
    reader = read_stream([STREAM])
    assert reader.text == "Hello, wörld ✓"
    assert reader.usage == USAGE
    assert reader.done


def test_sse_reader_one_byte_at_a_time() -> None:
    # Multi-byte UTF-8 characters are split too: lines are decoded only once complete.
    reader = read_stream([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert reader.text == "Hello, wörld ✓"
    assert reader.usage == USAGE
    assert reader.done


@pytest.mark.parametrize("size", [2, 3, 7, 13, 64])
def test_sse_reader_arbitrary_boundaries(size: int) -> None:
    reader = read_stream([STREAM[i : i + size] for i in range(0, len(STREAM), size)])
    assert reader.text == "Hello, wörld ✓"
    assert reader.usage == USAGE


def test_sse_reader_crlf_line_endings() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    assert read_stream([crlf]).text == "Hello, wörld ✓"
    # A boundary between \r and \n.
    pieces = [crlf[i : i + 1] for i in range(len(crlf))]
    reader = read_stream(pieces)
    assert reader.text == "Hello, wörld ✓"
    assert reader.usage == USAGE
    assert reader.done


def test_sse_reader_data_without_a_space() -> None:
    reader = read_stream([b'data:{"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'])
    assert reader.text == "x"


def test_sse_reader_no_deltas_means_no_text() -> None:
    reader = read_stream([chunk(None) + b"data: [DONE]\n\n"])
    assert reader.text is None
    assert reader.usage is None
    assert reader.done


def test_sse_reader_ignores_what_it_cannot_read() -> None:
    noise = (
        b"event: ping\n"
        b"id: 7\n"
        b"retry: 1000\n"
        b": a comment\n"
        b"data: not json\n"
        b"data: [1, 2]\n"
        b'data: {"choices": "nope"}\n'
        b'data: {"choices": [{"index": 0, "delta": "nope"}]}\n'
        b'data: {"choices": [{"index": 0, "delta": {"content": 5}}]}\n'
        b'data: {"usage": "nope"}\n'
        b"\n"
    )
    reader = read_stream([noise + chunk("ok") + b"data: [DONE]\n\n"])
    assert reader.text == "ok"
    assert reader.usage is None


def test_sse_reader_keeps_only_the_first_choice() -> None:
    reader = read_stream([chunk("A", index=0), chunk("B", index=1), chunk("C", index=0)])
    assert reader.text == "AC"


def test_sse_reader_caps_the_reply() -> None:
    piece = "x" * 1000
    n = MAX_REPLY_CHARS // 1000 + 5
    reader = read_stream([chunk(piece) for _ in range(n)] + [chunk("tail")])
    assert reader.text is not None
    assert len(reader.text) == MAX_REPLY_CHARS
    assert "tail" not in reader.text


def test_sse_reader_reads_a_last_line_without_a_newline_at_close() -> None:
    reader = SSEReader()
    reader.feed(chunk("Hello"))
    last = b'data: {"choices": [{"index": 0, "delta": {"content": " there"}}], "usage": {"total_tokens": 2}}'
    reader.feed(last)
    assert reader.text == "Hello"  # not complete yet
    reader.close()
    assert reader.text == "Hello there"
    assert reader.usage == {"total_tokens": 2}
    reader.close()  # idempotent
    assert reader.text == "Hello there"


def test_sse_reader_done_without_newline_at_close() -> None:
    reader = SSEReader()
    reader.feed(chunk("a") + b"data: [DONE]")
    assert not reader.done
    reader.close()
    assert reader.done


# --- JSONReader ----------------------------------------------------------------------------------


COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Yes, it's available."},
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
}


def read_json(raw: bytes, size: int | None = None) -> JSONReader:
    reader = JSONReader()
    size = size or len(raw) or 1
    for i in range(0, len(raw), size):
        reader.feed(raw[i : i + size])
    reader.close()
    return reader


def test_json_reader_text_and_usage() -> None:
    reader = read_json(orjson.dumps(COMPLETION), size=5)
    assert reader.text == "Yes, it's available."
    assert reader.usage == USAGE


def test_json_reader_caps_the_reply() -> None:
    long = {**COMPLETION, "choices": [{"index": 0, "message": {"content": "y" * (MAX_REPLY_CHARS + 10)}}]}
    reader = read_json(orjson.dumps(long))
    assert reader.text == "y" * MAX_REPLY_CHARS


def test_json_reader_does_not_parse_an_oversized_body() -> None:
    padding = "p" * MAX_PARSED_BYTES
    big = orjson.dumps({**COMPLETION, "padding": padding})
    assert len(big) > MAX_PARSED_BYTES
    reader = read_json(big, size=65536)
    assert reader.text is None
    assert reader.usage is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"choices": [',
        b"[1, 2]",
        b'{"error": {"message": "rate limited"}}',
        b'{"choices": [{"message": {"content": null, "tool_calls": []}}]}',
        b'{"choices": []}',
        b'{"choices": ["x"]}',
    ],
)
def test_json_reader_without_text(raw: bytes) -> None:
    reader = read_json(raw)
    assert reader.text is None


def test_json_reader_usage_must_be_an_object() -> None:
    assert read_json(orjson.dumps({**COMPLETION, "usage": 7})).usage is None
