"""A custom JSON chat API, described by where its fields are: ``{"message": "..."}`` -> ``{"reply": "..."}``.

Paths are dotted (``"input.text"``). Blocked requests are answered in the app's own shape, with the
refusal at the reply path, so the app's clients need no change. Such an API has no system message, so
layer 2 adds no instruction to its requests; a reply that starts with the refusal sentence (the app's
own prompt may use it) is still recognised in the log.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from guardrail.protocols.base import BadRequest, Conversation, ReplyReader
from guardrail.protocols.openai import MAX_REPLY_CHARS, BodyReader, content_text, parse_json_object


class JSONFields:
    """A chat API whose request holds the user's message, and whose reply the answer, at fixed paths."""

    name = "json"

    def __init__(self, message: str = "message", reply: str = "reply", previous: str | None = None) -> None:
        for label, path in (("message", message), ("reply", reply), ("previous", previous)):
            if path is not None and (not path or any(not key for key in path.split("."))):
                raise ValueError(f"{label} must be a dotted path such as 'input.text', got {path!r}")
        self.message = tuple(message.split("."))
        self.reply = tuple(reply.split("."))
        self.previous = tuple(previous.split(".")) if previous else None

    def parse(self, body: bytes) -> Conversation:
        """The message at the configured path; a missing or empty one means no user text."""
        payload = parse_json_object(body)
        text = content_text(_get(payload, self.message), ".".join(self.message))
        previous = None
        if self.previous is not None:
            previous = content_text(_get(payload, self.previous), ".".join(self.previous)) or None
        return Conversation(text=text if text.strip() else None, previous=previous)

    def refusal(self, conversation: Conversation, refusal: str, id: str) -> bytes:
        """The app's reply shape with the refusal at the reply path."""
        reply: Any = refusal
        for key in reversed(self.reply):
            reply = {key: reply}
        return orjson.dumps(reply)

    def refusal_stream(self, conversation: Conversation, refusal: str, id: str) -> Iterator[bytes]:
        """This format does not stream: the refusal is one JSON body."""
        yield self.refusal(conversation, refusal, id)

    def inject(self, conversation: Conversation, body: bytes, instruction: str) -> bytes:
        """The body unchanged: the app builds its own prompt, and this format has no place for one."""
        return body

    def reader(self, stream: bool) -> ReplyReader:
        """Reads the reply text at the reply path."""
        return _FieldReader(self.reply)


def _get(payload: Any, path: tuple[str, ...]) -> Any:
    """The value at a dotted path; None when a key on the way is absent."""
    for depth, key in enumerate(path):
        if payload is None:
            return None
        if not isinstance(payload, dict):
            where = ".".join(path[:depth]) or "the request body"
            raise BadRequest(f"'{where}' must be an object to hold '{'.'.join(path)}'")
        payload = payload.get(key)
    return payload


class _FieldReader(BodyReader):
    def __init__(self, path: tuple[str, ...]) -> None:
        super().__init__()
        self._path = path

    def read(self, payload: Any) -> None:
        for key in self._path:
            payload = payload.get(key) if isinstance(payload, dict) else None
        if isinstance(payload, str):
            self.text = payload[:MAX_REPLY_CHARS]
