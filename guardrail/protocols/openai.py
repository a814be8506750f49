"""The OpenAI chat-completions wire format: what is judged in a request, the refusal, and the reply.

The only module that knows this format. It extracts the last user message (a string, or a list of
parts whose text parts are joined) and the user turn before it, writes a blocked request's answer as a
``chat.completion`` or as a stream of ``chat.completion.chunk`` events, adds layer 2's instruction to a
passed request's system message, and reads the reply's text and usage back out of a relayed response
for the interaction log, without holding the response up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson

from guardrail.protocols.base import BadRequest, Conversation, ReplyReader

# The reply text kept for the log: enough for labels, bounded for memory.
MAX_REPLY_CHARS = 16_384
# A non-streamed reply larger than this is relayed but not parsed for the log.
MAX_PARSED_BYTES = 4 * 2**20
# The roles whose message sets the model's behaviour ("developer" is the newer models' name for it).
SYSTEM_ROLES = frozenset({"system", "developer"})


class OpenAIChat:
    """Chat completions: ``{"messages": [...], "stream": bool}`` in, ``chat.completion`` out."""

    name = "openai"

    def parse(self, body: bytes) -> Conversation:
        """Find what to judge in a request body, or raise ``BadRequest``."""
        payload = parse_json_object(body)
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array")
        turns: list[str] = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise BadRequest(f"'messages[{index}]' must be an object")
            role = message.get("role")
            # "User" too: an upstream that reads roles in any case would take it for the user's turn.
            if isinstance(role, str) and role.lower() == "user":
                text = content_text(message.get("content"), f"messages[{index}].content")
                if text.strip():
                    turns.append(text)
        stream = payload.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false")
        options = payload.get("stream_options")
        model = payload.get("model")
        return Conversation(
            text=turns[-1] if turns else None,
            previous=turns[-2] if len(turns) > 1 else None,
            stream=stream,
            model=model if isinstance(model, str) else None,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            payload=payload,
        )

    def inject(self, conversation: Conversation, body: bytes, instruction: str) -> bytes:
        """The body with ``instruction`` added to its first system (or developer) message, or as a new
        system message first when it has none."""
        payload = conversation.payload if conversation.payload is not None else parse_json_object(body)
        if not isinstance(payload.get("messages"), list):
            return body  # not a chat request: parse would have refused it
        # Copies, not edits: the parsed payload stays what the client sent.
        messages = list(payload["messages"])
        first = next(
            (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") in SYSTEM_ROLES), None
        )
        merged = _merged(messages[first], instruction) if first is not None else None
        if first is not None and merged is not None:
            messages[first] = merged
        else:
            messages.insert(0, {"role": "system", "content": instruction})
        try:
            return orjson.dumps({**payload, "messages": messages})
        except orjson.JSONEncodeError:
            # orjson reads deeper nesting than it writes (254 levels): such a body goes on as it came,
            # without layer 2, rather than being refused for a limit the client never heard of.
            return body

    def refusal(self, conversation: Conversation, refusal: str, id: str) -> bytes:
        """A complete ``chat.completion`` answering with the refusal sentence (in ``refusal`` rather
        than ``content`` when the request asked for Structured Outputs, see ``_structured``)."""
        message = (
            {"role": "assistant", "content": None, "refusal": refusal}
            if _structured(conversation)
            else {"role": "assistant", "content": refusal, "refusal": None}
        )
        return orjson.dumps(
            {
                "id": f"chatcmpl-{id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": conversation.model or "guardrail",
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                # Nothing reached a model, so nothing was used.
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
        )

    def refusal_stream(self, conversation: Conversation, refusal: str, id: str) -> Iterator[bytes]:
        """The refusal as server-sent ``chat.completion.chunk`` events, ending with ``[DONE]``."""
        base = {
            "id": f"chatcmpl-{id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": conversation.model or "guardrail",
        }
        field = "refusal" if _structured(conversation) else "content"
        deltas: list[tuple[dict[str, Any], str | None]] = [
            ({"role": "assistant", field: ""}, None),
            ({field: refusal}, None),
            ({}, "stop"),
        ]
        for delta, finish in deltas:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            yield _event({**base, "choices": [choice]})
        if conversation.include_usage:
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            yield _event({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    def reader(self, stream: bool) -> ReplyReader:
        """Something to feed the relayed reply's bytes to, for its text and usage."""
        return SSEReader() if stream else JSONReader()


def _structured(conversation: Conversation) -> bool:
    """Whether the request asked for Structured Outputs (``response_format`` of type ``json_schema``).
    Its reply must match the schema, so OpenAI's models put a refusal in the message's ``refusal``
    and leave ``content`` null; the SDKs' ``parse`` helpers then return no parsed object and the
    refusal, where refusal text in ``content`` would fail the schema and raise."""
    payload = conversation.payload
    form = payload.get("response_format") if payload is not None else None
    return isinstance(form, dict) and form.get("type") == "json_schema"


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or ``BadRequest`` saying what is wrong with it."""
    if not body.strip():
        raise BadRequest("the request body is empty; expected a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:  # orjson's own message points at the start of the body
            raise BadRequest(f"the request body is not valid UTF-8 (byte {bad.start})") from exc
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    return payload


def content_text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or the text parts of a list joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"'{where}' must be a string or an array of content parts")
    texts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"a text part of '{where}' has no string 'text'")
            texts.append(text)
    # Images, audio and files are not judged: the guard is a text model.
    return "\n".join(texts)


def _merged(message: dict[str, Any], instruction: str) -> dict[str, Any] | None:
    """A system message with the instruction after the owner's text, or None when its content is
    neither text nor parts (the upstream will say what is wrong with it)."""
    content = message.get("content")
    if content is None or (isinstance(content, str) and not content.strip()):
        return {**message, "content": instruction}
    if isinstance(content, str):
        return {**message, "content": f"{content}\n\n{instruction}"}
    if isinstance(content, list):
        return {**message, "content": [*content, {"type": "text", "text": instruction}]}
    return None


def error_body(message: str, type: str, code: str | int | None = None) -> bytes:
    """An OpenAI-style error body, as every SDK knows how to read it."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": None, "code": code}})


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class BodyReader:
    """Keeps a JSON reply body, up to ``MAX_PARSED_BYTES``, and reads it when complete."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self.text: str | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of the body."""
        self._size += len(chunk)
        if self._size <= MAX_PARSED_BYTES:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    def close(self) -> None:
        """The body is complete: parse what was kept."""
        if not self._chunks:
            return
        try:
            payload = orjson.loads(b"".join(self._chunks))
        except orjson.JSONDecodeError:
            return
        finally:
            self._chunks.clear()
        self.read(payload)

    def read(self, payload: Any) -> None:
        """Take the text and usage out of the parsed body."""
        raise NotImplementedError


class JSONReader(BodyReader):
    """Reads a non-streamed ``chat.completion`` for its text and usage."""

    def read(self, payload: Any) -> None:
        """The first choice's message and the usage."""
        if not isinstance(payload, dict):
            return
        usage = payload.get("usage")
        self.usage = usage if isinstance(usage, dict) else None
        choices = payload.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            message = choices[0].get("message")
            text = _reply_text(message)
            if text is not None:
                self.text = text[:MAX_REPLY_CHARS]


def _reply_text(message: Any) -> str | None:
    """The text of a reply's message (or a streamed delta of one): its content, or when it has none
    its refusal (what a model refusing under Structured Outputs sends)."""
    if not isinstance(message, dict):
        return None
    text = message.get("content")
    if not isinstance(text, str):
        text = message.get("refusal")
    return text if isinstance(text, str) else None


class SSEReader:
    """Reads a ``chat.completion.chunk`` event stream, piece by piece, for its text and usage."""

    def __init__(self) -> None:
        self._buffer = b""
        self._parts: list[str] = []
        self._length = 0
        self.usage: dict[str, Any] | None = None
        self.done = False

    @property
    def text(self) -> str | None:
        """The reply's text so far (the first choice's deltas), or None when no delta came."""
        return "".join(self._parts) if self._parts else None

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream; complete lines are read, the rest is kept."""
        self._buffer += chunk
        if b"\n" not in chunk:
            return
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line.rstrip(b"\r"))

    def close(self) -> None:
        """The stream ended: read a last line that had no newline."""
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r"))
            self._buffer = b""

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(payload, dict):
            return
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
        choices = payload.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            return
        if choices[0].get("index", 0) != 0:  # with n > 1, the log keeps the first choice
            return
        content = _reply_text(choices[0].get("delta"))
        if content and self._length < MAX_REPLY_CHARS:
            self._parts.append(content[: MAX_REPLY_CHARS - self._length])
            self._length += len(content)
