from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from guardrail import report, report_html
from guardrail.encoder import Encoder
from guardrail.errors import ConfigError, DataError
from guardrail.interactions import InteractionLog
from guardrail.report import build_report, read_log, run
from guardrail.report_html import quantile
from guardrail.settings import DEFAULT_REFUSAL
from guardrail.topics import average_linkage, find_topics

START = datetime(2025, 3, 3, 9, 0, tzinfo=timezone.utc)
WEATHER = [
    "What's the weather forecast for Berlin tomorrow?",
    "Will it rain in Lisbon this weekend?",
    "Is it going to snow in Chicago on Friday?",
    "<script>alert('owned')</script> Do I need an umbrella in London tomorrow?",
]
RECIPES = [
    "Give me a recipe for chocolate chip cookies",
    "How do I make lasagne from scratch?",
    "What's a good recipe for banana bread?",
    "Can you give me an easy vegan curry recipe?",
]
ON_TOPIC = "Can I book a viewing of the flat on Station Road on Saturday?"
SAVED = {
    "layer": "similarity",
    "prompt_tokens": 100.0,
    "completion_tokens": 250.0,
    "usd": 0.002,
    "shadow": False,
}


def request(n: int, verdict: str, text: str, minutes: float = 0.0, **extra: Any) -> dict[str, Any]:
    """An interaction record shaped like ``Gate.record``'s, ``minutes`` after START."""
    blocked = verdict in ("blocked", "would-block")
    record = {
        "id": f"gr-test{n:08d}",
        "time": (START + timedelta(minutes=minutes)).isoformat(timespec="milliseconds"),
        "scenario": "Real Estate Agency Assistant",
        "mode": "shadow" if verdict == "would-block" else "enforce",
        "path": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "stream": False,
        "text": text,
        "context": None,
        "verdict": verdict,
        "layer": "similarity",
        "score": -0.05 if blocked else 0.2,
        "threshold": 0.063,
        "classifier": None,
        "upstream": {"status": None, "usage": None, "error": None}
        if verdict == "blocked"
        else {"status": 200, "usage": {"prompt_tokens": 30, "completion_tokens": 70}, "error": None},
        "reply": None if verdict == "blocked" else "Yes, Saturday at ten works.",
        "llm_refused": None if verdict == "blocked" else False,
        "latency_ms": {
            "guard": 5.0,
            "upstream_first_byte": None if verdict == "blocked" else 400.0,
            "total": 9.0,
        },
        "saved": SAVED if verdict == "blocked" else None,
        "prompt_chars": len(text),
        "prompt_messages": 1,
    }
    record.update(extra)
    return record


def write_log(path: Path, records: Sequence[dict[str, Any]], **options: Any) -> Path:
    """Write ``records`` with the real interaction-log writer."""
    with InteractionLog(path, **options) as log:
        for record in records:
            assert log.write(record)
    return path


def never(texts: Sequence[str]) -> NDArray[np.float32]:
    raise AssertionError("the encoder must not run without refused messages")


def figure(page: str, key: str) -> str:
    found = re.search(rf'id="fig-{key}"><span class=v>([^<]*)<', page)
    assert found, key
    return found.group(1)


def test_report_counts_escapes_and_clusters(tmp_path: Path, encoder: Encoder) -> None:
    records = [request(i, "passed", ON_TOPIC, i) for i in range(6)]
    records += [request(10 + i, "blocked", text, 10 + i) for i, text in enumerate(WEATHER + RECIPES)]
    records.append(request(30, "blocked", "Translate 'good morning' into Japanese", 30))
    refusal = {"reply": DEFAULT_REFUSAL, "llm_refused": True, "saved": {**SAVED, "layer": "instruction"}}
    records.append(request(31, "passed", "Who won the football match last night?", 31, **refusal))
    records.append({"type": "feedback", "id": "gr-test00000010", "on_topic": False, "time": "2025-03-03"})
    log = write_log(tmp_path / "interactions.jsonl", records)
    out = tmp_path / "out" / "report.html"

    summary = build_report([log], out, encoder.encode)

    page = out.read_text()
    assert summary.out == out
    assert summary.requests == 16
    assert summary.verdicts == {"passed": 7, "blocked": 9, "would-block": 0, "unjudged": 0}
    assert summary.refusals == 1
    assert summary.feedback == 1
    assert summary.tokens_saved == 10 * 350
    assert summary.usd_saved == pytest.approx(10 * 0.002)
    assert summary.refused_messages == summary.clustered == 10
    assert figure(page, "requests") == "16"
    assert figure(page, "blocked") == "9"
    assert figure(page, "block-rate") == "56.2%"
    assert figure(page, "refusals") == "1"
    assert figure(page, "tokens-saved") == "3,500"
    assert figure(page, "usd-saved") == "$0.02"
    assert "<td>similarity</td><td>7</td><td>9</td><td>0</td><td>0</td><td>56.2%</td>" in page
    assert "<td>none (layer 1 alone)</td><td>16</td>" in page
    # User text is escaped wherever it appears; the page has no script of its own either.
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page

    topics = find_topics(read_log([log]).refused, encoder.encode, {})
    groups = [{t.representative, *t.examples} for t in topics]
    assert set(WEATHER) in groups
    assert set(RECIPES) in groups
    assert "#1 · 4 messages (4 distinct)" in page


def test_topics_count_repeats_and_human_labels(tmp_path: Path, encoder: Encoder) -> None:
    texts = [WEATHER[0]] * 3 + [WEATHER[1], RECIPES[0], RECIPES[1]]
    records = [request(i, "blocked", text, i) for i, text in enumerate(texts)]
    records += [
        {"type": "feedback", "id": "gr-test00000000", "on_topic": True, "time": START.isoformat()},
        {"type": "feedback", "id": "gr-test00000001", "on_topic": True, "time": START.isoformat()},
    ]
    tally = read_log([write_log(tmp_path / "log.jsonl", records)])

    topics = find_topics(tally.refused, encoder.encode, tally.feedback)

    weather, recipes = topics
    assert (weather.size, weather.distinct) == (4, 2)
    assert weather.representative == WEATHER[0]
    assert weather.layers == {"similarity": 4}
    assert (weather.said_on_topic, weather.said_off_topic) == (2, 0)
    assert (recipes.size, recipes.distinct) == (2, 2)
    assert "weather" in weather.words or "berlin" in weather.words


def test_empty_log(tmp_path: Path) -> None:
    log = tmp_path / "interactions.jsonl"
    log.touch()
    out = tmp_path / "report.html"

    summary = build_report([log], out, never)

    page = out.read_text()
    assert summary.requests == 0 and summary.topics == 0 and summary.tokens_saved is None
    assert "The log has no requests yet." in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interactions.jsonl", "report.html"]
    with pytest.raises(DataError, match="cannot write the report"):
        build_report([log], tmp_path, never)  # a directory
    assert "No blocked or refused messages" in page
    assert figure(page, "block-rate") == "n/a"
    assert page.count("no data") >= 5


def test_only_passed_requests(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", [request(i, "passed", ON_TOPIC, i) for i in range(5)])
    out = tmp_path / "report.html"

    summary = build_report([log], out, never)

    page = out.read_text()
    assert summary.verdicts["passed"] == 5 and summary.topics == 0
    assert figure(page, "block-rate") == "0.0%"
    assert figure(page, "tokens-saved") == "0"
    assert "No blocked or refused messages" in page


def test_records_without_the_saved_field_are_not_estimated(tmp_path: Path) -> None:
    old = []
    for i in range(4):
        record = request(i, "blocked" if i % 2 else "passed", ON_TOPIC, i)
        for name in ("saved", "prompt_chars", "prompt_messages"):
            del record[name]
        old.append(record)
    out = tmp_path / "report.html"

    summary = build_report([write_log(tmp_path / "old.jsonl", old)], out, None)

    page = out.read_text()
    assert summary.tokens_saved is None and summary.usd_saved is None
    assert figure(page, "tokens-saved") == "n/a"
    assert "has the <code>saved</code> field" in page
    assert "Not clustered: no encoder was given." in page

    mixed = [*old, request(9, "blocked", ON_TOPIC, 9), request(10, "passed", ON_TOPIC, 10)]
    summary = build_report([write_log(tmp_path / "mixed.jsonl", mixed)], out, None)
    assert summary.tokens_saved == 350
    assert "4 of 6 requests predate the saved field" in out.read_text()


def test_shadow_savings_and_unpriced_models_are_apart(tmp_path: Path) -> None:
    would = {**SAVED, "shadow": True}
    records = [
        request(1, "would-block", "Will it snow?", 0, saved=would),
        request(2, "blocked", "Will it snow?", 1, saved={**SAVED, "usd": None}),
    ]
    out = tmp_path / "report.html"

    summary = build_report([write_log(tmp_path / "log.jsonl", records)], out, None)

    page = out.read_text()
    assert summary.tokens_saved == 350 and summary.usd_saved is None
    assert "<td>would save (shadow)</td><td>similarity</td><td>100</td><td>250</td><td>$0.002</td>" in page
    assert "1 refused requests had no price" in page
    assert "Tokens blocking would have saved (shadow mode)" in page


def test_unreadable_lines_follow_the_log_readers(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", [request(1, "passed", ON_TOPIC)])
    with open(log, "ab") as file:
        file.write(b'{"id": "gr-torn", "verd')  # a write cut short: skipped
    assert read_log([log]).total().counts["requests"] == 1

    with open(log, "ab") as file:
        file.write(b"\n" + b'{"id": "gr-next"}\n')
    with pytest.raises(DataError, match=r"log\.jsonl:2: invalid JSON"):
        read_log([log])
    with pytest.raises(DataError, match="no such file"):
        read_log([tmp_path / "missing.jsonl"])


def test_rotated_backups_and_other_lines_are_read(tmp_path: Path) -> None:
    records = [request(i, "blocked" if i % 3 == 0 else "passed", ON_TOPIC, i) for i in range(30)]
    records.append({"text": "a labelled row", "on_topic": True})
    log = write_log(tmp_path / "log.jsonl", records, max_bytes=4000, backups=20)
    assert (tmp_path / "log.jsonl.1").exists()

    tally = read_log([log])

    counts = tally.total().counts
    assert counts["requests"] == 30 and counts["verdict:blocked"] == 10
    assert tally.other == 1


def test_clustered_messages_are_capped_to_the_most_recent(tmp_path: Path) -> None:
    records = [request(i, "blocked", f"{RECIPES[i % 4]} #{i}", i) for i in range(10)]
    out = tmp_path / "report.html"

    def encode(texts: Sequence[str]) -> NDArray[np.float32]:
        assert len(texts) == 3
        return np.eye(3, 8, dtype=np.float32)

    summary = build_report([write_log(tmp_path / "log.jsonl", records)], out, encode, max_texts=3)

    assert (summary.refused_messages, summary.clustered) == (10, 3)
    assert [r.text for r in read_log([tmp_path / "log.jsonl"], max_texts=3).refused] == [
        f"{RECIPES[i % 4]} #{i}" for i in (7, 8, 9)
    ]
    assert "(the most recent 3 of 10: older ones are left out)" in out.read_text()


@pytest.mark.parametrize(
    ("span", "width", "label"),
    [
        (timedelta(minutes=30), 60, "per minute"),
        (timedelta(hours=20), 900, "per 15 minutes"),
        (timedelta(days=10), 6 * 3600, "per 6 hours"),
        (timedelta(days=400), 7 * 86400, "per week"),
    ],
)
def test_time_buckets_follow_the_span(tmp_path: Path, span: timedelta, width: int, label: str) -> None:
    minutes = span.total_seconds() / 60
    records = [request(i, "passed", ON_TOPIC, minutes * i / 49) for i in range(50)]
    log = write_log(tmp_path / "log.jsonl", records)

    tally = read_log([log])

    assert tally.width == width
    times, buckets = tally.timeline()
    assert len(times) <= report.MAX_POINTS
    assert sum(b.counts["requests"] for b in buckets) == 50
    out = tmp_path / "report.html"
    build_report([log], out, None)
    assert f"Requests by verdict {label}" in out.read_text()


def test_buckets_coarsen_while_reading_without_losing_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "MAX_BUCKETS", 8)
    records = [request(i, "blocked", WEATHER[0], i * 7) for i in range(40)]
    records.append(request(99, "passed", ON_TOPIC, 0, time="not a time"))

    tally = read_log([write_log(tmp_path / "log.jsonl", records)])

    assert len(tally.buckets) <= 8
    assert tally.total().counts["requests"] == 41
    assert tally.untimed.counts["requests"] == 1
    assert int(tally.total().latency[0].sum()) == 41


def test_latency_quantiles_are_within_five_percent() -> None:
    histogram = np.zeros(report_html._BINS + 2, dtype=np.int64)
    for ms in range(1, 1001):
        histogram[report._bin(float(ms))] += 1

    p50, p99 = quantile(histogram, 0.5), quantile(histogram, 0.99)

    assert p50 == pytest.approx(500, rel=0.05)
    assert p99 == pytest.approx(990, rel=0.05)
    assert quantile(np.zeros(report_html._BINS + 2, dtype=np.int64), 0.5) is None


def test_average_linkage_merges_only_above_the_threshold() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16)
    vectors = np.repeat(centres, 5, axis=0) + rng.normal(scale=0.1, size=(15, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    clusters = average_linkage(vectors.astype(np.float32), np.ones(15), similarity=0.5)

    assert sorted(sorted(c) for c in clusters) == [list(range(0, 5)), list(range(5, 10)), list(range(10, 15))]
    assert len(average_linkage(vectors.astype(np.float32), np.ones(15), similarity=0.999)) == 15


def test_run_loads_no_encoder_without_refused_messages(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", [request(1, "passed", ON_TOPIC)])
    # An empty cache: loading the encoder would have to export it.
    summary = run([log], tmp_path / "report.html", model="no/such-model", cache_dir=tmp_path / "cache")

    assert summary.requests == 1
    assert not (tmp_path / "cache").exists()


def test_limits_must_be_positive(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", [request(1, "passed", ON_TOPIC)])

    with pytest.raises(ConfigError, match="at least 1"):
        build_report([log], tmp_path / "report.html", None, top=0)
    assert not (tmp_path / "report.html").exists()
