from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from guardrail.errors import DataError, MissingExtraError
from guardrail.evaluation import (
    EvalReport,
    auroc,
    load_labelled,
    plot_roc,
    report,
    threshold_for_leak,
    threshold_for_pass,
)

from samples import REPORT_KEYS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- auroc ---------------------------------------------------------------------------------------


def test_auroc_perfect_ranking() -> None:
    assert auroc(arr(0.7, 0.8, 0.9), arr(0.1, 0.2)) == 1.0


def test_auroc_reversed_ranking() -> None:
    assert auroc(arr(0.1, 0.2), arr(0.7, 0.8, 0.9)) == 0.0


def test_auroc_all_ties() -> None:
    assert auroc(arr(0.5, 0.5, 0.5), arr(0.5, 0.5)) == 0.5


def test_auroc_mixed_case_by_hand() -> None:
    # Pairs (on, off) won by on: 0.9 beats all 3; 0.4 beats 0.1; 0.6 beats 0.5 and 0.1 and ties 0.6.
    # (3 + 1 + 2.5) / 9
    assert auroc(arr(0.9, 0.4, 0.6), arr(0.5, 0.1, 0.6)) == pytest.approx(6.5 / 9)


def test_auroc_matches_pairwise_counting() -> None:
    rng = np.random.default_rng(7)
    on = rng.integers(0, 6, size=40).astype(float)  # many ties
    off = rng.integers(0, 4, size=30).astype(float)
    pairwise = ((on[:, None] > off[None, :]) + 0.5 * (on[:, None] == off[None, :])).mean()
    assert auroc(on, off) == pytest.approx(pairwise)


# --- thresholds ----------------------------------------------------------------------------------


def test_threshold_for_pass_on_twenty_scores() -> None:
    on = np.arange(1, 21, dtype=np.float64)  # 1..20
    threshold = threshold_for_pass(on, 0.95)
    assert threshold == 2.0  # 19 of 20 pass: exactly 95%
    assert np.mean(on >= threshold) == 0.95


def test_threshold_for_pass_rounds_towards_passing_more() -> None:
    on = np.arange(1, 11, dtype=np.float64)  # 10 scores: 95% means all ten
    assert threshold_for_pass(on, 0.95) == 1.0
    assert threshold_for_pass(on, 0.9) == 2.0
    assert threshold_for_pass(on, 0.5) == 6.0


def test_threshold_for_leak_on_twenty_scores() -> None:
    off = np.arange(1, 21, dtype=np.float64)
    threshold = threshold_for_leak(off, 0.05)
    assert 19.0 < threshold <= 20.0  # only the top score (20) gets through
    assert np.mean(off >= threshold) == 0.05


def test_threshold_for_leak_rounds_towards_leaking_less() -> None:
    off = np.arange(1, 11, dtype=np.float64)  # 10 scores: 5% leak means none
    threshold = threshold_for_leak(off, 0.05)
    assert threshold > 10.0
    assert np.mean(off >= threshold) == 0.0
    assert threshold_for_leak(off, 1.0) == 1.0


@pytest.mark.parametrize("n", [1, 3, 10, 20, 33, 100])
@pytest.mark.parametrize(("rate", "leak"), [(0.5, 0.5), (0.8, 0.2), (0.9, 0.1), (0.95, 0.05), (0.99, 0.01)])
@pytest.mark.parametrize("ties", [False, True])
def test_threshold_semantics(n: int, rate: float, leak: float, ties: bool) -> None:
    rng = np.random.default_rng(n)
    scores = rng.integers(0, 4, size=n).astype(float) if ties else rng.normal(size=n)
    eps = 1e-12  # rates are fractions k/n; compare them with the requested rate without float noise
    at_pass = threshold_for_pass(scores, rate)
    assert np.mean(scores >= at_pass) >= rate - eps  # at least `rate` pass...
    assert np.mean(scores >= np.nextafter(at_pass, np.inf)) < rate - eps  # ...and it is the highest such
    at_leak = threshold_for_leak(scores, leak)
    assert np.mean(scores >= at_leak) <= leak + eps  # at most `leak` leak...
    assert np.mean(scores >= np.nextafter(at_leak, -np.inf)) > leak + eps  # ...and it is the lowest such


# --- report --------------------------------------------------------------------------------------


def test_report_on_separable_scores() -> None:
    on = np.arange(20) / 20 + 1.0
    off = np.arange(20) / 20
    scores = np.concatenate([on, off])
    labels = np.array([True] * 20 + [False] * 20)
    result = report(scores, labels, threshold=0.5)
    assert result == EvalReport(
        auroc=1.0,
        block_rate_at_pass_95=1.0,
        pass_rate_at_leak_5=1.0,
        threshold=0.5,
        pass_rate=1.0,
        block_rate=0.5,
        n_on=20,
        n_off=20,
    )


def test_report_on_overlapping_scores() -> None:
    scores = arr(0.9, 0.8, 0.3, 0.7, 0.2, 0.85)
    labels = np.array([True, True, True, False, False, False])
    result = report(scores, labels, threshold=0.75)
    assert result.auroc == pytest.approx(6 / 9)  # on 0.9 beats 3 off, 0.8 beats 2, 0.3 beats 1
    assert result.pass_rate == pytest.approx(2 / 3)
    assert result.block_rate == pytest.approx(2 / 3)
    # At 95% pass every on-topic message must pass, so the threshold is 0.3: only 0.2 is blocked.
    assert result.block_rate_at_pass_95 == pytest.approx(1 / 3)
    # At 5% leak no off-topic message may pass: the threshold sits above 0.85, only 0.9 passes.
    assert result.pass_rate_at_leak_5 == pytest.approx(1 / 3)


def test_report_keys() -> None:
    scores = arr(0.9, 0.1)
    result = report(scores, np.array([True, False]), threshold=0.5).as_dict()
    assert list(result) == REPORT_KEYS
    assert isinstance(result["n_on"], int)
    assert isinstance(result["auroc"], float)


# --- load_labelled -------------------------------------------------------------------------------


def test_load_labelled_reads_rows_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            '{"text": "can I book a viewing?", "on_topic": true}',
            "",
            "   ",
            '{"text": "tell me a joke", "on_topic": false, "note": "extra keys are fine"}',
            '{"text": "what are your fees?", "on_topic": true}',
        ],
    )
    data = load_labelled(path)
    assert data.texts == ["can I book a viewing?", "tell me a joke", "what are your fees?"]
    assert data.on_topic.dtype == np.bool_
    assert data.on_topic.tolist() == [True, False, True]


GOOD = '{"text": "ok", "on_topic": true}'


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        pytest.param('{"text": "oops", "on_topic": true', "not valid JSON", id="invalid-json"),
        pytest.param('["text", true]', "JSON object", id="array-row"),
        pytest.param('"just a string"', "JSON object", id="string-row"),
        pytest.param('{"on_topic": true}', '"text" must be a non-empty string', id="missing-text"),
        pytest.param('{"text": "", "on_topic": true}', '"text" must be a non-empty string', id="empty-text"),
        pytest.param(
            '{"text": "   ", "on_topic": true}', '"text" must be a non-empty string', id="blank-text"
        ),
        pytest.param('{"text": 42, "on_topic": true}', '"text" must be a non-empty string', id="number-text"),
        pytest.param(
            '{"text": "hi", "on_topic": "yes"}',
            "\"on_topic\" must be true or false, got 'yes'",
            id="on-topic-string",
        ),
        pytest.param(
            '{"text": "hi", "on_topic": 1}', '"on_topic" must be true or false, got 1', id="on-topic-1"
        ),
        pytest.param('{"text": "hi"}', '"on_topic" must be true or false, got None', id="missing-on-topic"),
    ],
)
def test_load_labelled_errors_name_the_line(tmp_path: Path, bad: str, words: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", '{"text": "no", "on_topic": false}', bad, GOOD])
    with pytest.raises(DataError) as info:
        load_labelled(path)
    assert info.value.line == 4
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}:4: ")
    assert words in str(info.value)


def test_load_labelled_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"text": "caf\xe9", "on_topic": true}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: not valid JSON"):
        load_labelled(path)


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param([GOOD, GOOD], id="only-on-topic"),
        pytest.param(['{"text": "a", "on_topic": false}'], id="only-off-topic"),
        pytest.param([""], id="empty"),
    ],
)
def test_load_labelled_needs_both_classes(tmp_path: Path, rows: list[str]) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError, match="both on-topic and off-topic") as info:
        load_labelled(path)
    assert str(info.value).startswith(str(path))


def test_load_labelled_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read the data file"):
        load_labelled(tmp_path / "missing.jsonl")


# --- plot_roc ------------------------------------------------------------------------------------


@pytest.fixture
def mpl_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


def test_plot_roc_writes_a_png(tmp_path: Path, mpl_config: None) -> None:
    scores = arr(0.9, 0.8, 0.3, 0.7, 0.2, 0.85)
    labels = np.array([True, True, True, False, False, False])
    out = tmp_path / "roc.png"
    plot_roc(scores, labels, 0.75, out, title="Test bot")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert out.stat().st_size > 5_000


def test_plot_roc_unwritable_path_is_a_data_error(tmp_path: Path, mpl_config: None) -> None:
    scores = arr(0.9, 0.1)
    with pytest.raises(DataError, match="cannot write the plot"):
        plot_roc(
            scores, np.array([True, False]), 0.5, tmp_path / "no" / "such" / "dir" / "roc.png", title="x"
        )


def test_plot_roc_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'guardrail\[train\]'"):
        plot_roc(arr(0.9, 0.1), np.array([True, False]), 0.5, tmp_path / "roc.png", title="x")
    assert not (tmp_path / "roc.png").exists()
