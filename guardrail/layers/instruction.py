"""Layer 2: a system instruction that keeps the LLM itself on topic, and spotting its refusals.

Every request layer 1 passes (in enforce mode) reaches the LLM with an instruction built once, at
start-up, from the scenario document and the refusal sentence: what the assistant is for, and the exact
sentence to answer with when a question is not. Where the instruction goes in the request is the wire
format's business (``ChatProtocol.inject``).

A reply that starts with that sentence is the LLM's refusal: layer 1 let an off-topic question through,
and layer 2 caught it (tokens were spent, but fewer). ``RefusalDetector`` recognises the sentence as
models actually write it: in another case, with curly quotes, wrapped in quotes, backticks or bold,
without its final full stop, or followed by more text. A reply that only mentions the sentence later on
is not a refusal.
"""

from __future__ import annotations

from guardrail.errors import ConfigError
from guardrail.scenario import ScenarioDocument

# Characters models put around or inside the sentence without changing it: straight, curly and low
# quotes, guillemets, backticks and Markdown emphasis. They are dropped from both sides before
# comparing, so a curly apostrophe reads as a straight one, and "**I'm sorry**" as I'm sorry.
_DECORATION = "'\"`*_~\u00ab\u00b4\u00bb\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u2039\u203a"
_DROP = str.maketrans("", "", _DECORATION)
# What may end the refusal sentence, or be left off it: punctuation (ASCII, the ellipsis, full-width
# CJK) and whitespace.
_ENDING = ".!?;:,\u2026\u3002\uff01\uff1f \t\r\n"


def build_instruction(document: ScenarioDocument, template: str, refusal: str) -> str:
    """The instruction text for a scenario document: ``template`` with its placeholders filled in."""
    return template.format(
        title=document.title,
        description=document.description,
        scenarios="\n".join(f"- {scenario}" for scenario in document.scenarios),
        refusal=refusal,
    )


def _canonical(text: str) -> str:
    return " ".join(text.translate(_DROP).casefold().split())


class RefusalDetector:
    """Tells whether a reply starts with the refusal sentence, however the model decorated it."""

    def __init__(self, refusal: str) -> None:
        self.refusal = refusal
        self._key = _canonical(refusal).rstrip(_ENDING)
        if not self._key:
            raise ConfigError(f"the refusal {refusal!r} has no words to recognise in a reply")
        # Only the start of a reply can hold the sentence: however long a reply is, this many of its
        # first characters are enough, decoration included, so a check costs the same for any reply.
        self._window = 2 * len(refusal) + 64

    def matches(self, text: str | None) -> bool:
        """True when ``text`` starts with the refusal sentence (trailing text allowed)."""
        if not text:
            return False
        start = _canonical(text.lstrip()[: self._window])
        if not start.startswith(self._key):
            return False
        # "...answer that" must not match "...answer thatcher": the sentence ends at a word's end.
        following = start[len(self._key) : len(self._key) + 1]
        return not following.isalnum()
