"""Wire formats: the only modules that know what a chat request and reply look like."""

from guardrail.protocols.base import BadRequest, ChatProtocol, Conversation, ReplyReader
from guardrail.protocols.fields import JSONFields
from guardrail.protocols.openai import OpenAIChat

__all__ = ["BadRequest", "ChatProtocol", "Conversation", "JSONFields", "OpenAIChat", "ReplyReader"]
