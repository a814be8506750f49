"""What every wire format provides: a conversation to judge, a refusal, layer 2's instruction, and a
reader for the reply."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class BadRequest(Exception):
    """The request body cannot be judged; the message tells the client why (HTTP 400)."""


@dataclass(frozen=True)
class Conversation:
    """What a request asks, as far as the guard is concerned."""

    text: str | None  # the last user message; None when the request has no user text
    previous: str | None = None  # the user turn before it, the context for follow-ups
    stream: bool = False
    model: str | None = None
    include_usage: bool = False
    # The parsed request body, kept so that adding layer 2's instruction does not parse it again.
    # Not part of what the conversation is: left out of comparisons and repr.
    payload: dict[str, Any] | None = field(default=None, compare=False, repr=False)


class ReplyReader(Protocol):
    """Collects a reply's text and usage from its bytes as they are relayed."""

    @property
    def text(self) -> str | None:
        """The reply's text so far."""

    @property
    def usage(self) -> dict[str, Any] | None:
        """The reply's token usage, when the upstream reported it."""

    def feed(self, chunk: bytes) -> None: ...

    def close(self) -> None: ...


class ChatProtocol(Protocol):
    """A chat API's wire format."""

    name: str

    def parse(self, body: bytes) -> Conversation: ...

    def refusal(self, conversation: Conversation, refusal: str, id: str) -> bytes: ...

    def refusal_stream(self, conversation: Conversation, refusal: str, id: str) -> Iterator[bytes]: ...

    def inject(self, conversation: Conversation, body: bytes, instruction: str) -> bytes:
        """The request body with ``instruction`` as (part of) its system message.

        Returns ``body`` itself, the same object, when the format has nowhere to put it.
        """

    def reader(self, stream: bool) -> ReplyReader: ...
