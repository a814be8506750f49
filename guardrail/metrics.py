"""Prometheus metrics on an injected registry: what the guard decided, and what it cost.

Label sets are small and fixed. A test or an embedding app passes its own ``CollectorRegistry``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

VERDICTS = ("passed", "blocked", "would-block", "unjudged")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The guard's counters and histograms, registered once on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "guardrail_requests",
            "Guarded requests by verdict (passed, blocked, would-block, unjudged), layer and scenario.",
            ["verdict", "layer", "scenario"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "guardrail_rejected_requests",
            "Requests refused before judging: malformed (400) or too large (413).",
            ["reason"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "guardrail_upstream_errors",
            "Upstream failures: unreachable (502), timed out (504) or broken mid-response.",
            ["kind"],
            registry=self.registry,
        )
        self.llm_refusals = Counter(
            "guardrail_llm_refusals",
            "Passed requests the LLM answered with the refusal sentence: off topic, caught by layer 2.",
            ["scenario"],
            registry=self.registry,
        )
        self.guard_seconds = Histogram(
            "guardrail_guard_seconds",
            "Time to judge one message, queueing for the encoder included.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "guardrail_upstream_first_byte_seconds",
            "Time from sending a request upstream to its response headers.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.log_dropped = Counter(
            "guardrail_log_dropped_records",
            "Interaction records lost because the log queue was full or the disk failed.",
            registry=self.registry,
        )
        self.log_depth = Gauge(
            "guardrail_log_queue_depth", "Interaction records waiting to be written.", registry=self.registry
        )
