"""The HTTP-agnostic request pipeline shared by the proxy and the middleware.

A ``Gate`` turns a parsed conversation into a ``Decision`` (asking the guard, off the event loop),
names it in response headers, adds layer 2's instruction to a passed request, and writes the interaction
record and metrics once the reply is known, noting whether the LLM answered with the refusal, the tokens
the upstream used and what refusing saved (see ``guardrail/accounting.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import quote

from guardrail.accounting import Accounting, TokenEstimator, prompt_size
from guardrail.batching import Batcher
from guardrail.guard import Guard, Query, Verdict
from guardrail.interactions import InteractionLog, new_id
from guardrail.layers.classifier import Classifier
from guardrail.layers.instruction import RefusalDetector, build_instruction
from guardrail.metrics import VERDICTS, Metrics, multiprocess
from guardrail.prices import PriceTable
from guardrail.protocols.base import ChatProtocol, Conversation
from guardrail.settings import DEFAULT_REFUSAL, Mode, Settings

logger = logging.getLogger("guardrail.gate")

# Seconds between a request's end and its record (see Gate.record).
RECORD_DELAY = 0.002

Action = Literal["passed", "blocked", "would-block", "unjudged"]


class BodyTooLarge(Exception):
    """A request body is over ``max_body_bytes`` (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the limit of {limit} bytes")


def check_declared_length(headers: Iterable[tuple[bytes, bytes]], limit: int) -> None:
    """Refuse a body whose Content-Length is over the limit before reading any of it."""
    for key, value in headers:
        if key.lower() == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLarge(limit)


class BodyStalled(Exception):
    """A client sent nothing more of its request body for ``read_timeout`` seconds (HTTP 408)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the request body stopped arriving: nothing came for {timeout:g} s")


async def paced(chunks: AsyncIterator[bytes], timeout: float) -> AsyncIterator[bytes]:
    """Pass a body's chunks on, raising ``BodyStalled`` when the next one takes over ``timeout``
    seconds: a streamed upload holds an upstream connection, which a stalled client must not keep."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(iterator), timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise BodyStalled(timeout) from None
        yield chunk


async def limited(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """Pass a body's chunks on, raising ``BodyTooLarge`` once they add up to more than ``limit``."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        yield chunk


@dataclass(frozen=True)
class Decision:
    """What happens to one request, and the verdict behind it."""

    id: str
    action: Action
    verdict: Verdict | None
    guard_seconds: float
    started: float  # time.perf_counter() when the request arrived

    @property
    def blocked(self) -> bool:
        """True when the request is answered with the refusal and never reaches the upstream."""
        return self.action == "blocked"

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The ``x-guardrail-*`` response headers."""
        verdict = self.verdict
        return [
            (b"x-guardrail-id", self.id.encode()),
            (b"x-guardrail-verdict", self.action.encode()),
            (b"x-guardrail-layer", (verdict.layer if verdict else "none").encode()),
            (b"x-guardrail-score", (f"{verdict.score:.4f}" if verdict else "none").encode()),
            (b"x-guardrail-scenario", _header_value(verdict.scenario if verdict else "")),
        ]


@functools.lru_cache(maxsize=1024)
def _header_value(scenario: str) -> bytes:
    """A scenario as a header value: ASCII, so one in another script is percent-encoded (the
    document's few scenarios, encoded once each)."""
    return quote(scenario, safe=" -_.,;:/()'&+").encode()


class Gate:
    """Judges requests for one scenario and records what happened to them."""

    def __init__(
        self,
        guard: Guard,
        batcher: Batcher[Query, Verdict] | None = None,
        mode: Mode = "enforce",
        refusal: str = DEFAULT_REFUSAL,
        log: InteractionLog | None = None,
        metrics: Metrics | None = None,
        instruction: str | None = None,
        prices: PriceTable | None = None,
        estimator: TokenEstimator | None = None,
    ) -> None:
        self.guard = guard
        self.batcher = batcher if batcher is not None else Batcher(guard.judge_many)
        self.mode = mode
        self.refusal = refusal
        self.log = log
        self.metrics = metrics if metrics is not None else Metrics()
        self.scenario = guard.document.name
        self.instruction = instruction  # layer 2's text; None when layer 2 is off
        self.detector = RefusalDetector(refusal)
        # Created up front, so the series is there (at 0) before the first refusal.
        self._llm_refusals = self.metrics.llm_refusals.labels(self.scenario)
        self._counters: dict[tuple[str, str], Any] = {}  # guardrail_requests_total by (verdict, layer)
        self._seconds = {verdict: self.metrics.request_seconds.labels(verdict) for verdict in VERDICTS}
        self.accounting = Accounting(self.metrics, prices, estimator, instruction)
        self._classifier: Classifier | None = None
        self._classifier_label: str | None = None
        self._show_classifier()
        # The log queue's depth: read when scraped in one process. Values shared by worker processes
        # are written, not read, so there every record sets it (and the proxy samples idle workers).
        self._depth_per_record = multiprocess()
        self._pending: list[tuple[Any, ...]] = []  # records not written yet (see ``record``)
        self._flushing: asyncio.TimerHandle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        if not self._depth_per_record:
            self.metrics.log_depth.set_function(lambda: self.log.depth if self.log is not None else 0)

    @classmethod
    def from_settings(
        cls,
        guard: Guard,
        settings: Settings,
        log: InteractionLog | None = None,
        metrics: Metrics | None = None,
    ) -> Gate:
        """A gate with the settings' mode, refusal, layer-2 instruction and encoder workers."""
        batcher = Batcher(guard.judge_many, workers=settings.encoders, max_batch=settings.max_batch)
        instruction = None
        if settings.instruction:
            # Built once here: every passed request gets the same text.
            instruction = build_instruction(guard.document, settings.instruction_template, settings.refusal)
        return cls(
            guard, batcher, settings.mode, settings.refusal, log, metrics, instruction, prices=settings.prices
        )

    async def decide(self, conversation: Conversation) -> Decision:
        """Judge the conversation's last user message, with the previous turn as context."""
        return await self.start(conversation)

    def start(self, conversation: Conversation) -> Awaitable[Decision]:
        """``decide``, with the message queued for the encoder before this returns (call it on the
        event loop): the caller can prepare what it needs next while the encoder runs, then await."""
        started = time.perf_counter()
        if conversation.text is None:
            return self._unjudged(started)
        return self._decided(self.batcher.enqueue(Query(conversation.text, conversation.previous)), started)

    async def _unjudged(self, started: float) -> Decision:
        return Decision(new_id(), "unjudged", None, 0.0, started)

    async def _decided(self, pending: Awaitable[Verdict], started: float) -> Decision:
        verdict = await pending
        elapsed = time.perf_counter() - started
        self.metrics.guard_seconds.observe(elapsed)
        if verdict.allowed:
            action: Action = "passed"
        else:
            action = "blocked" if self.mode == "enforce" else "would-block"
        return Decision(new_id(), action, verdict, elapsed, started)

    def instruct(
        self, decision: Decision, conversation: Conversation, protocol: ChatProtocol, body: bytes
    ) -> bytes:
        """The body to send on: with layer 2's instruction if this request gets it, else ``body`` itself."""
        # Shadow mode only watches: what reaches the LLM must be what the client sent.
        if self.instruction is None or decision.action != "passed" or self.mode != "enforce":
            return body
        return protocol.inject(conversation, body, self.instruction)

    def record(
        self,
        decision: Decision,
        conversation: Conversation,
        path: str,
        status: int | None = None,
        usage: dict[str, Any] | None = None,
        reply: str | None = None,
        upstream_seconds: float | None = None,
        error: str | None = None,
        instructed: bool = False,
    ) -> None:
        """Count the request and queue its interaction record, a moment later; never blocks, never raises.

        ``instructed`` says whether layer 2's instruction went with the request.

        The work is done by ``flush``, ``RECORD_DELAY`` seconds later (and before a scrape, and at
        shutdown), for every request that ended meanwhile. Done at once, it delayed the next request: right
        after the encoder has run the event loop's code is cold, and building, counting and queueing a
        record took 0.1 to 0.2 ms of the loop at one client. Done when the next message is handed to the
        encoder, it delayed that: the encoder's thread needs the GIL to start. A moment later the encoder
        is inside onnxruntime, which runs without the GIL.
        """
        item = (decision, conversation, path, status, usage, reply, upstream_seconds, error, instructed)
        self._pending.append((*item, time.perf_counter() - decision.started, time.time()))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: now
            self.flush()
            return
        # One timer for all that are waiting; a new one if the loop it was on has gone (a test's).
        if self._flushing is None or self._flush_loop is not loop:
            if self._flushing is not None:
                self._flushing.cancel()
            self._flushing, self._flush_loop = loop.call_later(RECORD_DELAY, self.flush), loop

    def flush(self) -> None:
        """Count and log the requests recorded since the last flush."""
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        pending, self._pending = self._pending, []
        for item in pending:
            try:
                self._record(*item)
            except Exception:  # one bad record must not cost the others
                logger.exception("recording request %s failed", item[0].id)

    def _record(
        self,
        decision: Decision,
        conversation: Conversation,
        path: str,
        status: int | None,
        usage: dict[str, Any] | None,
        reply: str | None,
        upstream_seconds: float | None,
        error: str | None,
        instructed: bool,
        elapsed: float,
        when: float,
    ) -> None:
        verdict = decision.verdict
        layer = verdict.layer if verdict else "none"
        counter = self._counters.get((decision.action, layer))
        if counter is None:  # labels() takes a lock and builds a key: once per series, not per request
            counter = self._counters[decision.action, layer] = self.metrics.requests.labels(
                decision.action, layer, self.scenario
            )
        counter.inc()
        self._seconds[decision.action].observe(elapsed)
        if getattr(self.guard, "classifier", None) is not self._classifier:
            self._show_classifier()
        # A blocked request's reply is the gate's own refusal, not the LLM's.
        refused = None if decision.blocked or not reply else self.detector.matches(reply)
        if refused:
            self._llm_refusals.inc()
        size = prompt_size(conversation)
        saved = self.accounting.account(
            decision.action, layer, conversation.model, size, usage, reply, refused, instructed, error is None
        )
        if self.log is None:
            return
        record = {
            "id": decision.id,
            "time": datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds"),
            "scenario": self.scenario,
            "mode": self.mode,
            "path": path,
            "model": conversation.model,
            "stream": conversation.stream,
            "text": conversation.text,
            "context": conversation.previous,
            "verdict": decision.action,
            "layer": verdict.layer if verdict else None,
            "score": round(verdict.score, 6) if verdict else None,
            "threshold": round(verdict.threshold, 6) if verdict else None,
            "similarity_score": _rounded(verdict.similarity_score) if verdict else None,
            "classifier_score": _rounded(verdict.classifier_score) if verdict else None,
            "classifier": verdict.classifier if verdict else None,
            "sentence": verdict.sentence if verdict else None,
            "nearest_scenario": verdict.scenario if verdict else None,
            "followup": verdict.followup if verdict else False,
            "used_context": verdict.context if verdict else False,
            "upstream": {"status": status, "usage": usage, "error": error},
            "reply": reply,
            "instruction": instructed,
            "llm_refused": refused,
            "prompt_chars": size.chars,
            "prompt_messages": size.messages,
            "saved": None if saved is None else saved.record(),
            "latency_ms": {
                "guard": round(decision.guard_seconds * 1000, 3),
                "upstream_first_byte": None
                if upstream_seconds is None
                else round(upstream_seconds * 1000, 3),
                "total": round(elapsed * 1000, 3),
            },
        }
        if not self.log.write(record):
            self.metrics.log_dropped.inc()
        if self._depth_per_record:
            self.metrics.log_depth.set(self.log.depth)

    def _show_classifier(self) -> None:
        """Point ``guardrail_classifier_info`` at the classifier in force (a reload changes it)."""
        # getattr: a stand-in for the guard (a test's, an embedding app's) may have no layer 3 at all.
        classifier: Classifier | None = getattr(self.guard, "classifier", None)
        label = classifier.name if classifier is not None else "none"
        if self._classifier_label is not None and self._classifier_label != label:
            self.metrics.classifier.labels(self._classifier_label).set(0)
        self.metrics.classifier.labels(label).set(1)
        self._classifier, self._classifier_label = classifier, label


def _rounded(score: float | None) -> float | None:
    return None if score is None else round(score, 6)


def open_log(settings: Settings) -> InteractionLog | None:
    """The interaction log the settings ask for (not started), or None when it is off."""
    if settings.log_path is None:
        return None
    return InteractionLog(
        settings.log_path,
        max_bytes=settings.log_max_bytes,
        backups=settings.log_backups,
        queue_size=settings.log_queue,
    )
