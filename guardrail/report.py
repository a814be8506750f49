"""`guardrail report`: the interaction log as one self-contained HTML page, for teams without Grafana.

The page covers what the dashboard shows (``dashboards/guardrail.json``), read from the log instead of
Prometheus: requests and verdicts by layer, the block rate over time, tokens and cost saved (the
records' ``saved`` field; older records lack it, and the page says so rather than estimating), the LLM's
refusals, guard and total latency, the classifiers seen, and the most frequent blocked topics.

This module reads the log into a ``LogTally`` and writes the page (``build_report``, and ``run`` for
the command line). The refused messages are clustered into topics by ``guardrail.topics``, and the page
and its charts are drawn by ``guardrail.report_html``.

The log is streamed, never held in memory. Counts go into time buckets that start at ten seconds and
get coarser (to a minute, five, fifteen, an hour, six hours, a day, a week) whenever there are too many,
and end as coarse as the log's span needs for about ``MAX_POINTS`` points per chart. Every width divides
the next, so merging buckets is exact. Latencies go into histograms of 10%-wide bins, so p50 and p99 are
within 5% and merge like the counts; Prometheus estimates its quantiles from buckets the same way. The
bins are laid out in ``guardrail.report_html``, which reads them back, so that the imports run one way:
this module imports the page, never the reverse. Of the refused messages, only the most recent
``max_texts`` are kept for clustering.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from guardrail.errors import ConfigError, DataError
from guardrail.interactions import logs_named, read_records
from guardrail.metrics import VERDICTS
from guardrail.models import DEFAULT_MODEL
from guardrail.report_html import _BIN_LOW, _BIN_RATIO, _BINS, _LATENCIES, _sum, render
from guardrail.topics import Encode, _Refused, find_topics

Counts = defaultdict[str, float]

WIDTHS = (10, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)  # seconds; each divides the next
MAX_POINTS = 120  # per chart
MAX_BUCKETS = 5000  # kept while reading, before coarsening
MAX_TEXTS = 5000  # refused messages clustered: the most recent
_TEXT_CHARS = 2000  # of a refused message, kept for clustering


@dataclass(frozen=True)
class ReportSummary:
    """What a report found, for the command line to print."""

    out: Path
    requests: int
    verdicts: dict[str, int]
    refusals: int  # passed requests the LLM answered with the refusal sentence
    feedback: int
    tokens_saved: float | None  # None when no record has the ``saved`` field
    usd_saved: float | None  # None when no saving has a price
    refused_messages: int  # blocked, would-block and LLM-refused messages in the log
    clustered: int  # of those, embedded and clustered (the most recent ``max_texts``)
    topics: int  # clusters of two messages or more


@dataclass
class _Bucket:
    counts: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    latency: NDArray[np.int64] = field(default_factory=lambda: np.zeros((3, _BINS + 2), np.int64))

    def merge(self, other: _Bucket) -> None:
        for key, value in other.counts.items():
            self.counts[key] += value
        self.latency += other.latency


@dataclass
class LogTally:
    """Everything the report needs from the log, gathered in one streaming pass."""

    max_texts: int = MAX_TEXTS
    width: int = WIDTHS[0]
    buckets: dict[int, _Bucket] = field(default_factory=dict)
    untimed: _Bucket = field(default_factory=_Bucket)  # requests without a readable time
    classifiers: dict[str, list[Any]] = field(default_factory=dict)  # name: [count, first, last]
    refused: deque[_Refused] = field(default_factory=deque)
    refused_seen: int = 0
    feedback: dict[str, bool] = field(default_factory=dict)  # id: on topic, the last label wins
    other: int = 0  # lines that are neither requests nor feedback
    first: float | None = None
    last: float | None = None

    def __post_init__(self) -> None:
        self.refused = deque(maxlen=self.max_texts)

    def add(self, record: dict[str, Any]) -> None:
        """Count one log record."""
        if record.get("type") == "feedback":
            if isinstance(record.get("on_topic"), bool):
                self.feedback[str(record.get("id"))] = record["on_topic"]
            return
        verdict = record.get("verdict")
        if verdict not in VERDICTS:
            self.other += 1
            return
        t = _timestamp(record.get("time"))
        bucket = self.untimed if t is None else self._bucket(t)
        c = bucket.counts
        layer = str(record.get("layer") or "none")
        c["requests"] += 1
        c[f"verdict:{verdict}"] += 1
        c[f"layer:{verdict}:{layer}"] += 1
        if verdict != "unjudged":
            c["judged"] += 1
        if verdict in ("blocked", "would-block"):
            c[f"blocked:{layer}"] += 1
        refused = record.get("llm_refused")
        if refused is not None:
            c["replied"] += 1
            c["refused"] += refused is True
        text = record.get("text")
        if (verdict in ("blocked", "would-block") or refused is True) and isinstance(text, str) and text:
            # Capped: the encoder reads about 256 tokens, and a log can hold huge messages.
            refused_text = text[:_TEXT_CHARS]
            self.refused.append(
                _Refused(str(record.get("id")), refused_text, "instruction" if refused else layer)
            )
            self.refused_seen += 1
        if "saved" in record:
            c["with_saved"] += 1
            _count_saved(c, record["saved"])
        upstream = record.get("upstream")
        usage = upstream.get("usage") if isinstance(upstream, dict) else None
        if isinstance(usage, dict):
            for kind in ("prompt", "completion"):
                c[f"used:{kind}"] += _number(usage.get(f"{kind}_tokens")) or 0.0
        latency = record.get("latency_ms")
        if isinstance(latency, dict):
            for row, name in enumerate(_LATENCIES):
                ms = _number(latency.get(name))
                if ms is not None:
                    bucket.latency[row, _bin(ms)] += 1
        if verdict != "unjudged":
            name = str(record.get("classifier") or "none")
            seen = self.classifiers.setdefault(name, [0, t, t])
            seen[0] += 1
            if t is not None:
                seen[1] = t if seen[1] is None else min(seen[1], t)
                seen[2] = t if seen[2] is None else max(seen[2], t)

    def _bucket(self, t: float) -> _Bucket:
        self.first = t if self.first is None else min(self.first, t)
        self.last = t if self.last is None else max(self.last, t)
        key = int(t // self.width)
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS and self.width < WIDTHS[-1]:
                self.coarsen(WIDTHS[WIDTHS.index(self.width) + 1])
                return self._bucket(t)
            bucket = self.buckets[key] = _Bucket()
        return bucket

    def coarsen(self, width: int) -> None:
        """Merge the buckets into wider ones (``width`` is a multiple of the current one)."""
        merged: dict[int, _Bucket] = {}
        for key, bucket in self.buckets.items():
            merged.setdefault(key * self.width // width, _Bucket()).merge(bucket)
        self.buckets, self.width = merged, width

    def finish(self) -> None:
        """Coarsen to the width that shows the whole span in at most ``MAX_POINTS`` points."""
        if self.first is None or self.last is None:
            return
        for width in WIDTHS:
            if width >= self.width and (self.last // width - self.first // width) < MAX_POINTS:
                break
        if width > self.width:
            self.coarsen(width)

    def total(self) -> _Bucket:
        """All requests, timed or not."""
        total = _Bucket()
        total.merge(self.untimed)
        for bucket in self.buckets.values():
            total.merge(bucket)
        return total

    def timeline(self) -> tuple[list[float], list[_Bucket]]:
        """Bucket start times and buckets from the first to the last, empty ones included."""
        if not self.buckets:
            return [], []
        low, high = min(self.buckets), max(self.buckets)
        keys = range(low, high + 1)
        return [k * self.width for k in keys], [self.buckets.get(k, _Bucket()) for k in keys]


def _count_saved(c: Counts, saved: Any) -> None:
    if not isinstance(saved, dict):
        return
    layer = str(saved.get("layer"))
    side = "would" if saved.get("shadow") else "saved"
    for kind in ("prompt", "completion"):
        c[f"{side}:{layer}:{kind}"] += _number(saved.get(f"{kind}_tokens")) or 0.0
    usd = _number(saved.get("usd"))
    if usd is None:
        c[f"{side}:unpriced"] += 1
    else:
        c[f"{side}:{layer}:usd"] += usd
        c[f"{side}:priced"] += 1


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _bin(ms: float) -> int:
    if ms < _BIN_LOW:
        return 0
    return min(_BINS + 1, int(math.log(ms / _BIN_LOW) / math.log(_BIN_RATIO)) + 1)


def read_log(paths: Iterable[Path], max_texts: int = MAX_TEXTS) -> LogTally:
    """Stream interaction logs, each with its rotated backups, into a ``LogTally``."""
    tally = LogTally(max_texts)
    for _, _, record in read_records(logs_named(paths)):
        tally.add(record)
    tally.finish()
    return tally


def build_report(
    paths: Sequence[Path],
    out: Path,
    encode: Encode | None,
    *,
    top: int = 20,
    max_texts: int = MAX_TEXTS,
) -> ReportSummary:
    """Read the logs and write the report to ``out``; without ``encode``, topics are not clustered."""
    if top < 1 or max_texts < 1:
        raise ConfigError(f"the report needs top and max_texts of at least 1, got {top} and {max_texts}")
    tally = read_log(paths, max_texts)
    topics = None if encode is None else find_topics(list(tally.refused), encode, tally.feedback)
    page = render(tally, topics, top=top, sources=paths)
    # Written beside and renamed, so a reader never sees half a page; opened as usual, so the umask holds.
    partial = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise DataError(f"cannot write the report: {exc.strerror or exc}", str(out)) from exc
    total = tally.total().counts
    saved = _sum(total, "saved:", ("prompt", "completion"))
    return ReportSummary(
        out=out,
        requests=int(total["requests"]),
        verdicts={v: int(total[f"verdict:{v}"]) for v in VERDICTS},
        refusals=int(total["refused"]),
        feedback=len(tally.feedback),
        tokens_saved=saved if total["with_saved"] else None,
        usd_saved=_sum(total, "saved:", ("usd",)) if total["saved:priced"] else None,
        refused_messages=tally.refused_seen,
        clustered=len(tally.refused) if topics is not None else 0,
        topics=len(topics or []),
    )


def run(
    logs: Sequence[Path],
    out: Path,
    model: str = DEFAULT_MODEL,
    cache_dir: Path | None = None,
    top: int = 20,
    max_texts: int = MAX_TEXTS,
    threads: int = 1,
) -> ReportSummary:
    """``guardrail report``: the encoder is loaded only if the log has refused messages to cluster."""
    from guardrail.encoder import Encoder

    loaded: list[Encoder] = []

    def encode(texts: Sequence[str]) -> NDArray[np.float32]:
        if not loaded:
            loaded.append(Encoder.load(model, cache_dir=cache_dir, threads=threads))
        return loaded[0].encode(texts)

    return build_report(logs, out, encode, top=top, max_texts=max_texts)
