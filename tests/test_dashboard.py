"""The Grafana dashboard: it imports anywhere, and it asks only for series a real proxy exposes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from guardrail.metrics import Metrics
from guardrail.settings import DEFAULT_REFUSAL

from samples import OFF_TOPIC, ON_TOPIC
from upstreams import FakeOpenAI, ProxyServer, closed_port

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "guardrail.json"
DATASOURCE = "${DS_PROMETHEUS}"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus when it scrapes; never in an exposition
MODEL = "gpt-test"

_NAME = re.compile(r"\b(guardrail_[a-z0-9_]+)")
_SELECTOR = re.compile(r"\b(guardrail_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
_GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")

Samples = dict[str, set[str]]  # sample name: the label names its samples carry


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [
        (panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"${variable['name']}", variable["query"]["query"]))
    return found


def check(dashboard: dict[str, Any], samples: Samples, labels: bool = True) -> list[str]:
    """What ``dashboard`` asks for that ``samples`` lack: metric names, and with ``labels`` the label
    names its selectors match on and its aggregations group by."""
    problems = []
    for where, expr in expressions(dashboard):
        names = set(_NAME.findall(expr))
        assert names, f"{where}: no guardrail metric in {expr}"
        problems += [f"{where}: {name}" for name in sorted(names - samples.keys())]
        if not labels:
            continue
        for name, matchers in _SELECTOR.findall(expr):
            for label in set(_MATCHER.findall(matchers)) - TARGET_LABELS - samples.get(name, set()):
                problems.append(f"{where}: {name} has no label {label!r}")
        carried = set().union(*(samples.get(name, set()) for name in names))
        for grouping in _GROUPING.findall(expr):
            for label in {g.strip() for g in grouping.split(",") if g.strip()} - carried:
                problems.append(f"{where}: no metric in {expr!r} has the label {label!r}")
    return problems


def scrape(url: str) -> Samples:
    samples: Samples = {}
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_dashboard_imports_anywhere() -> None:
    dashboard = load()

    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert "scenario" in variables["scenario"]["query"]["query"]
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        area = {(box["x"] + i, box["y"] + j) for i in range(box["w"]) for j in range(box["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
    # Every panel is narrowed by the job variable, so one Prometheus can hold several deployments.
    for panel in panels(dashboard):
        for expr in (target["expr"] for target in panel.get("targets", [])):
            assert not re.search(r"\bguardrail_\w+(?!\w)(?!\s*\{)", expr), f"{panel['title']}: {expr}"
            for name, matchers in _SELECTOR.findall(expr):
                assert "job" in _MATCHER.findall(matchers), f"{panel['title']}: {name} ignores $job"


def test_dashboard_names_are_declared() -> None:
    """Every name is one the registry exposes: counters end in _total, histograms in _bucket/_sum/_count."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    declared: Samples = {
        family.name + suffix: set()
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }

    assert check(load(), declared, labels=False) == []


def test_dashboard_names_exist_in_a_real_scrape(
    start_proxy: Callable[..., ProxyServer], fake_upstream: FakeOpenAI
) -> None:
    """Drive proxies until every series the dashboard reads exists, then compare with their /metrics."""
    enforce = start_proxy(fake_upstream.url)
    shadow = start_proxy(fake_upstream.url, mode="shadow")
    down = start_proxy(f"http://127.0.0.1:{closed_port()}")

    def ask(proxy: ProxyServer, text: str, expected: tuple[int, str]) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        response = proxy.http().post("/v1/chat/completions", json=body)
        assert (response.status_code, response.headers["x-guardrail-verdict"]) == expected

    ask(enforce, ON_TOPIC[0], (200, "passed"))  # upstream tokens and cost, request latency
    ask(enforce, OFF_TOPIC[0], (200, "blocked"))  # tokens and cost saved by layer 1
    fake_upstream.reset(reply=DEFAULT_REFUSAL)
    ask(enforce, ON_TOPIC[1], (200, "passed"))  # the LLM refuses: layer 2's refusal and its saving
    fake_upstream.reset()
    ask(shadow, OFF_TOPIC[1], (200, "would-block"))  # what blocking would have saved
    ask(down, ON_TOPIC[2], (502, "passed"))  # upstream unreachable
    response = enforce.http().post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400  # rejected as malformed
    wait_for_requests(enforce, 3)
    wait_for_requests(shadow, 1)
    wait_for_requests(down, 1)
    assert enforce.metric("guardrail_llm_refusals_total") == 1

    samples: Samples = {}
    for proxy in (enforce, shadow, down):
        for name, labels in scrape(proxy.url).items():
            samples.setdefault(name, set()).update(labels)

    assert check(load(), samples) == []


def wait_for_requests(proxy: ProxyServer, count: int, timeout: float = 5.0) -> None:
    """Wait until the proxy has counted ``count`` guarded requests (they are counted as they finish)."""
    deadline = time.monotonic() + timeout
    while proxy.metric("guardrail_requests_total") < count:
        assert time.monotonic() < deadline, f"{proxy.url} counted fewer than {count} requests"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('sum(rate(guardrail_requests{job=~"$job"}[5m]))', "guardrail_requests"),
        (
            'histogram_quantile(0.5, rate(guardrail_guard_seconds{job=~"$job"}[5m]))',
            "guardrail_guard_seconds",
        ),
        ('sum(guardrail_log_queue_depth{job=~"$job", verdict="x"})', "no label 'verdict'"),
        ('sum by (color) (guardrail_log_queue_depth{job=~"$job"})', "the label 'color'"),
    ],
)
def test_the_check_catches_wrong_names_and_labels(expr: str, problem: str) -> None:
    dashboard = {"panels": [{"title": "t", "targets": [{"expr": expr}]}], "templating": {"list": []}}
    samples: Samples = {
        "guardrail_requests_total": {"verdict", "layer", "scenario"},
        "guardrail_guard_seconds_bucket": {"le"},
        "guardrail_log_queue_depth": set(),
    }

    problems = check(dashboard, samples)

    assert len(problems) == 1 and problem in problems[0]
