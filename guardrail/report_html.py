"""The page of ``guardrail report``: one self-contained HTML document with inline SVG charts.

``render`` turns a ``LogTally`` (``guardrail.report``) and the topics (``guardrail.topics``) into the
page: summary cards, requests and verdicts, tokens and cost saved, the LLM's refusals, latency, the
classifiers seen and the most frequent blocked topics. Charts are inline SVG drawn here, without
JavaScript or network access; every text from the log is escaped, since it is whatever users typed.

The latency histograms' layout (``_LATENCIES`` and the ``_BIN_*`` bins) lives here with ``quantile``,
which reads it, and ``guardrail.report`` imports it to fill the bins: the report imports this module,
and this module names the report's types only for type checking, so there is no import cycle.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from guardrail.guard import normalise
from guardrail.metrics import LAYERS, VERDICTS
from guardrail.topics import SIMILARITY, Topic

if TYPE_CHECKING:
    from guardrail.report import Counts, LogTally, _Bucket

_LATENCIES = ("guard", "upstream_first_byte", "total")
_BIN_RATIO, _BIN_LOW, _BINS = 1.1, 0.01, 220  # latency bins in ms: 0.01 ms to about 3.5 hours
_SHOWN_CHARS = 300  # of a message, shown on the page
_PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#7f7f7f")


def quantile(histogram: NDArray[np.int64], q: float) -> float | None:
    """The ``q`` quantile of a latency histogram in ms (the bin's geometric middle), None if empty."""
    n = int(histogram.sum())
    if n == 0:
        return None
    k = int(np.searchsorted(np.cumsum(histogram), q * n))
    return 0.0 if k == 0 else _BIN_LOW * _BIN_RATIO ** (k - 0.5)


def _sum(counts: Counts, prefix: str, kinds: Sequence[str], layers: Sequence[str] = LAYERS) -> float:
    return float(sum(counts[f"{prefix}{layer}:{kind}"] for layer in layers for kind in kinds))


def render(
    tally: LogTally, topics: list[Topic] | None, *, top: int = 20, sources: Sequence[Path] = ()
) -> str:
    """The report as one HTML document."""
    total = tally.total()
    c = total.counts
    times, buckets = tally.timeline()
    chart = _Charts(times, tally.width)
    span = (
        f"{_when(tally.first)} to {_when(tally.last)} UTC, one point per {_duration(tally.width)}"
        if tally.first is not None and tally.last is not None
        else "no timed requests"
    )
    parts = [
        f"<h1>guardrail report</h1><p class=meta>{_e(', '.join(map(str, sources)))}: {_e(span)}.</p>",
        _cards(tally, c),
    ]
    if not c["requests"]:
        parts.append("<p class=note>The log has no requests yet.</p>")
    parts += [
        _verdicts(c, buckets, chart),
        _savings(c, buckets, chart),
        _refusals(c, buckets, chart),
        _latency(total, buckets, chart),
        _classifiers(tally),
        _topics(tally, topics, top),
    ]
    notes = []
    if tally.untimed.counts["requests"]:
        notes.append(
            f"{_n(tally.untimed.counts['requests'])} requests without a readable time are counted "
            "in the totals but not in the charts."
        )
    if tally.other:
        notes.append(f"{_n(tally.other)} lines were neither requests nor feedback and were skipped.")
    notes.append(f"Generated {_when(datetime.now(timezone.utc).timestamp())} UTC by guardrail report.")
    parts.append("<footer>" + "".join(f"<p>{_e(note)}</p>" for note in notes) + "</footer>")
    return _PAGE.format(body="\n".join(parts))


def _cards(tally: LogTally, c: Counts) -> str:
    judged = c["judged"]
    blocked = c["verdict:blocked"] + c["verdict:would-block"]
    cards = [
        ("requests", _n(c["requests"]), "requests"),
        ("passed", _n(c["verdict:passed"]), "passed"),
        ("blocked", _n(c["verdict:blocked"]), "blocked"),
        ("would-block", _n(c["verdict:would-block"]), "would-block (shadow)"),
        ("block-rate", _pct(blocked, judged), "block rate of judged"),
        ("refusals", _n(c["refused"]), "LLM refusals (layer 2)"),
        (
            "tokens-saved",
            _n(_sum(c, "saved:", ("prompt", "completion"))) if c["with_saved"] else "n/a",
            "tokens saved",
        ),
        ("usd-saved", _usd(_sum(c, "saved:", ("usd",))) if c["saved:priced"] else "n/a", "USD saved"),
        ("feedback", _n(len(tally.feedback)), "human labels"),
    ]
    return (
        "<div class=cards>"
        + "".join(
            f'<div class=card id="fig-{key}"><span class=v>{_e(value)}</span>'
            f"<span class=k>{_e(label)}</span></div>"
            for key, value, label in cards
        )
        + "</div>"
    )


def _verdicts(c: Counts, buckets: list[_Bucket], chart: _Charts) -> str:
    layers = sorted({key.split(":", 2)[2] for key in c if key.startswith("layer:")})
    rows = [
        [layer, *(_n(c[f"layer:{v}:{layer}"]) for v in VERDICTS), _pct(c[f"blocked:{layer}"], c["judged"])]
        for layer in layers
    ]
    rows.append(
        [
            "all",
            *(_n(c[f"verdict:{v}"]) for v in VERDICTS),
            _pct(c["verdict:blocked"] + c["verdict:would-block"], c["judged"]),
        ]
    )
    table = _table(["layer", *VERDICTS, "block rate"], rows, "verdicts")
    requests = chart.draw(
        "Requests by verdict",
        [(v, [b.counts[f"verdict:{v}"] for b in buckets]) for v in VERDICTS],
        stacked=True,
    )
    rate = chart.draw(
        "Block rate by layer (blocked and would-block, of judged requests)",
        [
            (layer, [_ratio(b.counts[f"blocked:{layer}"], b.counts["judged"]) for b in buckets])
            for layer in ("similarity", "classifier")
        ],
        fmt=lambda v: f"{v * 100:.0f}%",
    )
    return f"<section><h2>Requests and verdicts</h2>{table}{requests}{rate}</section>"


def _savings(c: Counts, buckets: list[_Bucket], chart: _Charts) -> str:
    head = "<section><h2>Tokens and cost saved</h2>"
    if not c["with_saved"]:
        return head + (
            "<p class=note>No request in this log has the <code>saved</code> field (it was written "
            "before token accounting), so tokens and cost saved are not shown.</p></section>"
        )
    notes = []
    if c["with_saved"] < c["requests"]:
        notes.append(
            f"{_n(c['requests'] - c['with_saved'])} of {_n(c['requests'])} requests predate the "
            "saved field and count as saving nothing."
        )
    for side, what in (("saved", "refused"), ("would", "shadow-mode would-block")):
        if c[f"{side}:unpriced"]:
            notes.append(
                f"{_n(c[f'{side}:unpriced'])} {what} requests had no price (their model is missing "
                "from the price table): their tokens count, their USD does not."
            )
    rows = []
    for side, label in (("saved", "saved"), ("would", "would save (shadow)")):
        for layer in LAYERS:
            tokens = [c[f"{side}:{layer}:{kind}"] for kind in ("prompt", "completion")]
            if any(tokens) or c[f"{side}:{layer}:usd"]:
                rows.append([label, layer, _n(tokens[0]), _n(tokens[1]), _usd(c[f"{side}:{layer}:usd"])])
    used = c["used:prompt"] + c["used:completion"]
    saved = _sum(c, "saved:", ("prompt", "completion"))
    rows.append(["used upstream", "", _n(c["used:prompt"]), _n(c["used:completion"]), ""])
    text = (
        f"<p>Blocking saved {_pct(saved, saved + used)} of the tokens the LLM would otherwise have "
        "used (saved, of saved plus the upstream's reported usage). Savings are estimates: see the "
        "README's accounting section.</p>"
    )
    table = _table(["", "layer", "prompt tokens", "completion tokens", "USD"], rows, "savings")
    charts = [
        chart.draw(
            "Tokens saved, by layer and kind",
            [
                (f"{layer} {kind}", [b.counts[f"saved:{layer}:{kind}"] for b in buckets])
                for layer in LAYERS
                for kind in ("prompt", "completion")
            ],
            stacked=True,
        ),
        chart.draw(
            "USD saved, by layer",
            [(layer, [b.counts[f"saved:{layer}:usd"] for b in buckets]) for layer in LAYERS],
            stacked=True,
            fmt=_usd,
        ),
        chart.draw(
            "Upstream tokens used and saved",
            [
                ("used", [b.counts["used:prompt"] + b.counts["used:completion"] for b in buckets]),
                ("saved", [_sum(b.counts, "saved:", ("prompt", "completion")) for b in buckets]),
            ],
        ),
    ]
    if _sum(c, "would:", ("prompt", "completion")):
        charts.append(
            chart.draw(
                "Tokens blocking would have saved (shadow mode)",
                [
                    (layer, [_sum(b.counts, "would:", ("prompt", "completion"), [layer]) for b in buckets])
                    for layer in LAYERS
                ],
                stacked=True,
            )
        )
    body = "".join(f"<p class=note>{_e(note)}</p>" for note in notes)
    return f"{head}{body}{text}{table}{''.join(charts)}</section>"


def _refusals(c: Counts, buckets: list[_Bucket], chart: _Charts) -> str:
    text = (
        f"<p>The LLM answered {_n(c['refused'])} passed requests with the refusal sentence "
        f"({_pct(c['refused'], c['replied'])} of the {_n(c['replied'])} replies checked): off-topic "
        "messages layer 1 let through and layer 2's instruction caught.</p>"
    )
    drawn = chart.draw("LLM refusals", [("refusals", [b.counts["refused"] for b in buckets])], stacked=True)
    return f"<section><h2>LLM refusals (layer 2)</h2>{text}{drawn}</section>"


def _latency(total: _Bucket, buckets: list[_Bucket], chart: _Charts) -> str:
    names = {"guard": "guard", "upstream_first_byte": "upstream first byte", "total": "total"}
    rows = [
        [
            label,
            _n(int(total.latency[row].sum())),
            _ms(quantile(total.latency[row], 0.5)),
            _ms(quantile(total.latency[row], 0.99)),
        ]
        for row, label in enumerate(names.values())
    ]
    table = _table(["latency", "requests", "p50", "p99"], rows, "latency")
    charts = "".join(
        chart.draw(
            f"{names[name].capitalize()} latency",
            [
                (f"p{round(q * 100)}", [quantile(b.latency[_LATENCIES.index(name)], q) for b in buckets])
                for q in (0.5, 0.99)
            ],
            fmt=_ms,
        )
        for name in ("guard", "total")
    )
    note = "<p class=note>Percentiles come from histograms with 10% wide bins: within 5%.</p>"
    return f"<section><h2>Latency</h2>{table}{note}{charts}</section>"


def _classifiers(tally: LogTally) -> str:
    rows = [
        [name if name != "none" else "none (layer 1 alone)", _n(count), _when(first), _when(last)]
        for name, (count, first, last) in sorted(tally.classifiers.items(), key=lambda i: i[1][1] or 0)
    ]
    table = _table(["classifier", "judged requests", "first seen", "last seen"], rows, "classifiers")
    return f"<section><h2>Classifier versions</h2>{table}</section>"


def _topics(tally: LogTally, topics: list[Topic] | None, top: int) -> str:
    head = "<section><h2>Most frequent blocked topics</h2>"
    if topics is None:
        return head + "<p class=note>Not clustered: no encoder was given.</p></section>"
    if not tally.refused:
        return head + "<p class=note>No blocked or refused messages in this log.</p></section>"
    shown, seen = len(tally.refused), tally.refused_seen
    alone = shown - sum(topic.size for topic in topics)
    intro = (
        f"<p>{_n(shown)} messages were blocked, would have been blocked, or refused by the LLM"
        + (f" (the most recent {_n(shown)} of {_n(seen)}: older ones are left out)" if shown < seen else "")
        + f". By meaning they form {_n(len(topics))} topics of two messages or more"
        + (f", the largest {_n(top)} shown" if len(topics) > top else "")
        + f"; {_n(alone)} messages are each alone. Off-topic topics make good "
        "<code>## Off-topic examples</code> for the scenario document, or labels for <code>guardrail "
        "retrain</code>; a topic your bot should serve is a missing scenario.</p><p class=note>Messages are "
        f"embedded with the guard's encoder and grouped by average linkage: a topic's messages are, on "
        f"average, at least {SIMILARITY:g} alike (cosine). The message shown first is the most central; the "
        "words are those most frequent in the topic and rare in the other refused messages.</p>"
    )
    items = []
    for rank, topic in enumerate(topics[:top], start=1):
        layers = ", ".join(f"{layer} {_n(n)}" for layer, n in topic.layers.items())
        labels = ""
        if topic.said_on_topic or topic.said_off_topic:
            labels = f"; humans said on topic {topic.said_on_topic}, off topic {topic.said_off_topic}"
        hint = ""
        if topic.said_on_topic > topic.said_off_topic:
            hint = "<p class=hint>Mostly labelled on topic by humans: a scenario may be missing.</p>"
        examples = "".join(f"<li>{_e(_short(example))}</li>" for example in topic.examples)
        items.append(
            f'<article class=topic id="topic-{rank}"><h3>#{rank} · {_n(topic.size)} messages '
            f"({_n(topic.distinct)} distinct) · {_e(', '.join(topic.words))}</h3>"
            f"<blockquote>{_e(_short(topic.representative))}</blockquote>"
            f"<p class=meta>refused by {_e(layers)}{_e(labels)}</p>{hint}"
            + (f"<ul>{examples}</ul>" if examples else "")
            + "</article>"
        )
    off = [t for t in topics[:top] if t.said_on_topic <= t.said_off_topic]
    snippet = "## Off-topic examples\n" + "".join(f"- {_short(normalise(t.representative))}\n" for t in off)
    copy = f"<h3>To paste into the scenario document</h3><pre>{_e(snippet)}</pre>" if off else ""
    return head + intro + "".join(items) + copy + "</section>"


class _Charts:
    """Inline SVG charts over one timeline: lines, or bars stacked per time bucket."""

    W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 210, 66, 40, 12, 30

    def __init__(self, times: list[float], width: int) -> None:
        self.times = times
        self.width = width
        self.step = (self.W - self.LEFT - self.RIGHT) / max(1, len(times))

    def draw(
        self,
        title: str,
        series: Sequence[tuple[str, Sequence[float | None]]],
        *,
        stacked: bool = False,
        fmt: Callable[[float], str] | None = None,
    ) -> str:
        """A figure of ``series`` (name, one value per bucket; None leaves a gap in a line)."""
        fmt = fmt or _n
        series = [(name, values) for name, values in series if any(values)]
        keys = "".join(
            f'<span class=key><i style="background:{_colour(i)}"></i>{_e(name)}</span>'
            for i, (name, _) in enumerate(series)
        )
        caption = f"<figcaption>{_e(title)} per {_e(_duration(self.width))}{keys}</figcaption>"
        if not series or not self.times:
            return f"<figure>{caption}<p class=empty>no data</p></figure>"
        columns = [
            [v or 0.0 for v in column] for column in zip(*(values for _, values in series), strict=True)
        ]
        peak = max(sum(column) if stacked else max(column) for column in columns)
        tick = _nice(peak / 4)
        top = tick * max(1, math.ceil(peak / tick))
        plot = self.H - self.TOP - self.BOTTOM

        def y(v: float) -> float:
            return self.TOP + plot * (1 - v / top)

        marks = [self._axes(tick, top, y, fmt)]
        for s, (name, values) in enumerate(series):
            marks += (
                self._bars(s, name, values, columns, y, fmt)
                if stacked
                else self._line(s, name, values, y, fmt)
            )
        svg = (
            f'<svg viewBox="0 0 {self.W} {self.H}" role="img" aria-label="{_e(title)}">{"".join(marks)}</svg>'
        )
        return f"<figure>{caption}{svg}</figure>"

    def _axes(self, tick: float, top: float, y: Callable[[float], float], fmt: Callable[[float], str]) -> str:
        marks = []
        for k in range(round(top / tick) + 1):
            at = y(k * tick)
            marks.append(
                f'<line class=grid x1="{self.LEFT}" x2="{self.W - self.RIGHT}" y1="{at:.1f}" y2="{at:.1f}"/>'
                f'<text class=ytick x="{self.LEFT - 6}" y="{at + 4:.1f}">{_e(fmt(k * tick))}</text>'
            )
        last = len(self.times) - 1
        for i in sorted({round(j * last / 5) for j in range(6)}):
            label = _e(self._label(self.times[i]))
            marks.append(f'<text class=xtick x="{self._x(i):.1f}" y="{self.H - 10}">{label}</text>')
        return "".join(marks)

    def _bars(
        self,
        s: int,
        name: str,
        values: Sequence[float | None],
        columns: list[list[float]],
        y: Callable[[float], float],
        fmt: Callable[[float], str],
    ) -> list[str]:
        marks = []
        for i, v in enumerate(values):
            if v:
                base = sum(columns[i][:s])  # the series drawn before this one, below it
                marks.append(
                    f'<rect x="{self._x(i) - self.step * 0.4:.1f}" y="{y(base + v):.1f}" '
                    f'width="{self.step * 0.8:.1f}" height="{y(base) - y(base + v):.1f}" fill="{_colour(s)}">'
                    f"{self._tip(name, i, v, fmt)}</rect>"
                )
        return marks

    def _line(
        self,
        s: int,
        name: str,
        values: Sequence[float | None],
        y: Callable[[float], float],
        fmt: Callable[[float], str],
    ) -> list[str]:
        marks: list[str] = []
        runs: list[list[str]] = []
        run: list[str] = []
        for i, v in enumerate(values):
            if v is None:
                runs.append(run)
                run = []
                continue
            run.append(f"{self._x(i):.1f},{y(v):.1f}")
            marks.append(
                f'<circle cx="{self._x(i):.1f}" cy="{y(v):.1f}" r="2.2" fill="{_colour(s)}">'
                f"{self._tip(name, i, v, fmt)}</circle>"
            )
        lines = [
            f'<polyline fill="none" stroke="{_colour(s)}" stroke-width="1.6" points="{" ".join(points)}"/>'
            for points in [*runs, run]
            if len(points) > 1
        ]
        return lines + marks

    def _x(self, i: int) -> float:
        return self.LEFT + (i + 0.5) * self.step

    def _tip(self, name: str, i: int, value: float, fmt: Callable[[float], str]) -> str:
        return f"<title>{_e(name)}, {_e(_when(self.times[i]))}: {_e(fmt(value))}</title>"

    def _label(self, t: float) -> str:
        moment = datetime.fromtimestamp(t, timezone.utc)
        if self.width >= 86400:
            return moment.strftime("%d %b")
        if self.times[-1] - self.times[0] < 86400:
            return moment.strftime("%H:%M")
        return moment.strftime("%d %b %H:%M")


def _colour(series: int) -> str:
    return _PALETTE[series % len(_PALETTE)]


def _nice(x: float) -> float:
    """The smallest of 1, 2, 2.5 and 5 times a power of ten that is at least ``x`` (1 for nothing)."""
    if x <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(x))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= x * (1 - 1e-9))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], name: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(headers)}">none</td></tr>'
    return f'<table id="table-{name}"><tr>{head}</tr>{body}</table>'


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _n(value: float) -> str:
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4g}"


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g} ms" if value < 1000 else f"{value / 1000:.3g} s"


def _pct(part: float, whole: float) -> str:
    return f"{part / whole * 100:.1f}%" if whole else "n/a"


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _when(t: float | None) -> str:
    return "n/a" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: int) -> str:
    for unit, size in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return unit if count == 1 else f"{count} {unit}s"
    return f"{seconds} seconds"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>guardrail report</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 820px; margin: 2em auto;
  padding: 0 1em; }}
h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }}
h3 {{ font-size: 1em; margin: .2em 0; }}
.meta, .note, footer {{ color: #666; }}
.cards {{ display: flex; flex-wrap: wrap; gap: .6em; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: .5em .8em; min-width: 7em; }}
.card .v {{ display: block; font-size: 1.5em; font-weight: 600; }}
.card .k {{ color: #666; font-size: .85em; }}
table {{ border-collapse: collapse; margin: .8em 0; }}
th, td {{ border-bottom: 1px solid #eee; padding: .25em .7em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1.2em 0; }}
figcaption {{ font-weight: 600; margin-bottom: .3em; }}
.key {{ font-weight: normal; margin-left: 1em; font-size: .85em; }}
.key i {{ display: inline-block; width: .8em; height: .8em; margin-right: .3em; }}
svg {{ width: 100%; height: auto; font-size: 11px; }}
svg .grid {{ stroke: #eee; }}
svg .ytick {{ text-anchor: end; fill: #666; }}
svg .xtick {{ text-anchor: middle; fill: #666; }}
.empty {{ color: #999; }}
.topic {{ border-left: 3px solid #0072b2; padding-left: .8em; margin: 1.2em 0; }}
.topic blockquote {{ margin: .3em 0; font-size: 1.05em; }}
.topic ul {{ margin: .2em 0; color: #444; }}
.hint {{ color: #d55e00; }}
pre {{ background: #f6f6f6; padding: .8em; overflow-x: auto; white-space: pre-wrap; }}
</style></head>
<body>
{body}
</body></html>
"""
