"""Prometheus metrics on an injected registry: what the guard decided, what it saved, what it cost.

Label sets are small and fixed: verdict, layer, kind and reason take a handful of values each, and the
scenario label is the document's name. A test or an embedding app passes its own ``CollectorRegistry``.

Several worker processes (``guardrail serve --workers N``) share their counts through prometheus-client's
multiprocess mode: with ``PROMETHEUS_MULTIPROC_DIR`` set before the workers start, every value lives in a
file in that directory, and ``exposition`` adds up all the workers' files in one scrape. Gauges say how
they combine across workers (``multiprocess_mode``); in one process they behave as usual.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

VERDICTS = ("passed", "blocked", "would-block", "unjudged")
# Layers a request can be refused by, as the token and cost savings name them: layer 1 (similarity),
# layer 3 (classifier), and layer 2 (instruction), where the LLM answered with the refusal sentence.
LAYERS = ("similarity", "classifier", "instruction")
TOKEN_KINDS = ("prompt", "completion")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    """True when prometheus-client keeps its values in files shared by worker processes."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


class Metrics:
    """The guard's counters, gauges and histograms, registered once on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "guardrail_requests",
            "Guarded requests by verdict (passed, blocked, would-block, unjudged), layer and scenario.",
            ["verdict", "layer", "scenario"],
            registry=r,
        )
        self.rejected = Counter(
            "guardrail_rejected_requests",
            "Requests refused before judging: malformed (400), too large (413) or a stalled upload (408).",
            ["reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "guardrail_upstream_errors",
            "Upstream failures: unreachable (502), timed out (504) or broken mid-response.",
            ["kind"],
            registry=r,
        )
        self.llm_refusals = Counter(
            "guardrail_llm_refusals",
            "Passed requests the LLM answered with the refusal sentence: off topic, caught by layer 2.",
            ["scenario"],
            registry=r,
        )
        # What blocking saved, estimated (see guardrail/accounting.py). Shadow mode blocks nothing, so
        # what it would have saved is counted apart, never as saved.
        self.tokens_saved = Counter(
            "guardrail_tokens_saved",
            "Estimated LLM tokens not spent because a request was refused, by layer and kind "
            "(prompt, completion).",
            ["layer", "kind"],
            registry=r,
        )
        self.cost_saved = Counter(
            "guardrail_cost_saved_usd",
            "Estimated USD not spent because a request was refused, by layer (from the price table).",
            ["layer"],
            registry=r,
        )
        self.tokens_would_save = Counter(
            "guardrail_tokens_would_save",
            "Shadow mode: estimated tokens that blocking would have saved, by layer and kind.",
            ["layer", "kind"],
            registry=r,
        )
        self.cost_would_save = Counter(
            "guardrail_cost_would_save_usd",
            "Shadow mode: estimated USD that blocking would have saved, by layer.",
            ["layer"],
            registry=r,
        )
        self.upstream_tokens = Counter(
            "guardrail_upstream_tokens",
            "Tokens the upstream reported using (its usage field), by kind (prompt, completion).",
            ["kind"],
            registry=r,
        )
        self.upstream_cost = Counter(
            "guardrail_upstream_cost_usd",
            "USD the upstream's reported usage cost, from the price table.",
            registry=r,
        )
        self.guard_seconds = Histogram(
            "guardrail_guard_seconds",
            "Time to judge one message, queueing for the encoder included.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "guardrail_upstream_first_byte_seconds",
            "Time from sending a request upstream to its response headers.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "guardrail_request_seconds",
            "Time from a guarded request's arrival to the end of its response, by verdict.",
            ["verdict"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.classifier = Gauge(
            "guardrail_classifier_info",
            "The layer-3 classifier in force: 1 for its name, 0 for one it replaced; 'none' without one.",
            ["classifier"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.log_dropped = Counter(
            "guardrail_log_dropped_records",
            "Interaction records lost because the log queue was full or the disk failed.",
            registry=r,
        )
        self.log_depth = Gauge(
            "guardrail_log_queue_depth",
            "Interaction records waiting to be written.",
            registry=r,
            multiprocess_mode="livesum",
        )

    def exposition(self) -> bytes:
        """The Prometheus text format: this registry's values, or every worker's when shared."""
        if not multiprocess():
            return generate_latest(self.registry)
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
