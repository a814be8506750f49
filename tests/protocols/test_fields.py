from __future__ import annotations

from typing import Any

import orjson
import pytest

from guardrail.protocols.base import BadRequest, Conversation
from guardrail.protocols.fields import JSONFields
from guardrail.protocols.openai import MAX_PARSED_BYTES, MAX_REPLY_CHARS

REFUSAL = "Sorry, I only answer questions about property."


def parse(protocol: JSONFields, payload: Any) -> Conversation:
    return protocol.parse(orjson.dumps(payload))


def read(protocol: JSONFields, raw: bytes, size: int = 7) -> str | None:
    reader = protocol.reader(stream=False)
    for i in range(0, len(raw), size):
        reader.feed(raw[i : i + size])
    reader.close()
    assert reader.usage is None
    return reader.text


def test_default_paths() -> None:
    protocol = JSONFields()
    conversation = parse(protocol, {"message": "Is the flat available?", "session": "abc"})
    assert conversation == Conversation(text="Is the flat available?")
    assert orjson.loads(protocol.refusal(conversation, REFUSAL, "gr-1")) == {"reply": REFUSAL}
    assert read(protocol, orjson.dumps({"reply": "Yes it is."})) == "Yes it is."


def test_dotted_paths_in_and_out() -> None:
    protocol = JSONFields(message="input.text", reply="output.answer.text", previous="input.previous")
    payload = {"input": {"text": "and the second one?", "previous": "Is the flat available?"}}
    conversation = parse(protocol, payload)
    assert conversation.text == "and the second one?"
    assert conversation.previous == "Is the flat available?"
    refusal = orjson.loads(protocol.refusal(conversation, REFUSAL, "gr-1"))
    assert refusal == {"output": {"answer": {"text": REFUSAL}}}
    assert read(protocol, orjson.dumps({"output": {"answer": {"text": "Yes."}}, "id": 3})) == "Yes."


def test_content_parts_at_the_message_path() -> None:
    protocol = JSONFields()
    parts = [{"type": "text", "text": "Is it"}, {"type": "image_url"}, {"type": "text", "text": "furnished?"}]
    assert parse(protocol, {"message": parts}).text == "Is it\nfurnished?"


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"message": None},
        {"message": ""},
        {"message": "  \n"},
        {"other": "Is the flat available?"},
    ],
)
def test_missing_or_empty_message_means_no_user_text(payload: dict[str, Any]) -> None:
    assert parse(JSONFields(), payload).text is None


def test_missing_leaf_under_a_present_parent_means_no_user_text() -> None:
    assert parse(JSONFields(message="input.text"), {"input": {}}).text is None


def test_missing_parent_of_a_dotted_path_means_no_user_text() -> None:
    assert parse(JSONFields(message="input.text"), {"other": 1}).text is None


@pytest.mark.parametrize("payload", [{"input": "text"}, {"input": ["text"]}, {"input": 3}])
def test_a_parent_that_is_not_an_object_is_a_bad_request(payload: dict[str, Any]) -> None:
    with pytest.raises(BadRequest, match=r"'input' must be an object to hold 'input\.text'"):
        parse(JSONFields(message="input.text"), payload)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", "the request body is empty"),
        (b"nope", "the request body is not valid JSON"),
        (b'["message"]', "the request body must be a JSON object"),
        (b'{"message": 42}', "'message' must be a string or an array of content parts"),
        (b'{"message": [{"type": "text"}]}', "a text part of 'message' has no string 'text'"),
    ],
)
def test_malformed_requests_are_bad_requests(raw: bytes, words: str) -> None:
    with pytest.raises(BadRequest) as info:
        JSONFields().parse(raw)
    assert str(info.value).startswith(words)


def test_previous_is_read_only_when_configured() -> None:
    payload = {"message": "and the second one?", "previous": "Is the flat available?"}
    assert parse(JSONFields(), payload).previous is None
    configured = JSONFields(previous="previous")
    assert parse(configured, payload).previous == "Is the flat available?"
    assert parse(configured, {"message": "hi"}).previous is None
    assert parse(configured, {"message": "hi", "previous": ""}).previous is None


def test_a_request_never_streams() -> None:
    conversation = parse(JSONFields(), {"message": "hi", "stream": True, "model": "m"})
    assert conversation.stream is False
    assert conversation.model is None


def test_refusal_stream_is_the_one_json_body() -> None:
    protocol = JSONFields(reply="data.reply")
    conversation = Conversation(text="x")
    assert list(protocol.refusal_stream(conversation, REFUSAL, "gr-1")) == [
        protocol.refusal(conversation, REFUSAL, "gr-1")
    ]


def test_refusal_escapes_json() -> None:
    refusal = 'Say "no" \\ and\nstop — ✓'
    assert orjson.loads(JSONFields().refusal(Conversation(text="x"), refusal, "gr-1")) == {"reply": refusal}


@pytest.mark.parametrize(
    ("kwargs", "label"),
    [
        ({"message": ""}, "message"),
        ({"message": "input."}, "message"),
        ({"message": ".text"}, "message"),
        ({"message": "input..text"}, "message"),
        ({"reply": ""}, "reply"),
        ({"reply": "a..b"}, "reply"),
        ({"previous": ""}, "previous"),
        ({"previous": "history."}, "previous"),
    ],
)
def test_invalid_path_specs_raise_value_error(kwargs: dict[str, str], label: str) -> None:
    with pytest.raises(ValueError, match=f"^{label} must be a dotted path"):
        JSONFields(**kwargs)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"reply": 42}',
        b'{"reply": {"text": "nested"}}',
        b'{"answer": "wrong field"}',
        b'"just a string"',
        b"[]",
    ],
)
def test_reader_without_a_reply_text(raw: bytes) -> None:
    assert read(JSONFields(), raw) is None


def test_reader_caps_the_reply_and_skips_oversized_bodies() -> None:
    long = orjson.dumps({"reply": "r" * (MAX_REPLY_CHARS + 5)})
    assert read(JSONFields(), long, size=4096) == "r" * MAX_REPLY_CHARS
    huge = orjson.dumps({"reply": "ok", "padding": "p" * MAX_PARSED_BYTES})
    assert read(JSONFields(), huge, size=65536) is None
