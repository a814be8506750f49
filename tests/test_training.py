from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from guardrail.errors import ConfigError, DataError, MissingExtraError, ModelError
from guardrail.evaluation import measure, stratified_folds, stratified_split
from guardrail.guard import Guard
from guardrail.layers.classifier import CARD_FORMAT, Classifier
from guardrail.layers.similarity import FEATURE_NAMES
from guardrail.settings import DEFAULT_REFUSAL
from guardrail.training import (
    MIN_EXAMPLES,
    Label,
    deduplicate,
    read_labels,
    retrain,
    write_classifier,
)

from samples import OFF_TOPIC, ON_TOPIC

# --- data ----------------------------------------------------------------------------------------

_STREETS = ["Station Road", "Chestnut Avenue", "Mill Lane", "High Street", "Park Crescent", "Elm Close"]
_HOMES = ["flat", "house", "studio", "bungalow", "maisonette"]
_ON = [
    "Is the {home} on {place} still available to rent?",
    "Can I book a viewing of the {home} on {place} next week?",
    "How much deposit do you want for the {home} on {place}?",
    "I'd like a valuation of my {home} on {place} before I sell it",
    "Does the landlord of the {home} on {place} allow pets?",
]
_PLACES = ["Berlin", "Madrid", "Chicago", "Osaka", "Lagos", "Lima"]
_THINGS = ["lasagne", "pancakes", "a curry", "banana bread", "sushi"]
_OFF = [
    "Is it going to rain in {place} this weekend? I'm planning a picnic with {thing}",
    "Give me a recipe for {thing} like they make in {place}",
    "Who won the football match in {place} last night? Was it about {thing}?",
    "Write me a poem about {thing} and {place}",
    "Recommend a film set in {place} about {thing}",
]


def estate_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` on-topic and ``n`` off-topic real-estate rows, templated; ``start`` picks other texts."""
    on = [t.format(home=h, place=p) for h, p, t in itertools.product(_HOMES, _STREETS, _ON)]
    off = [t.format(thing=h, place=p) for h, p, t in itertools.product(_THINGS, _PLACES, _OFF)]
    on, off = (ON_TOPIC + on)[start : start + n], (OFF_TOPIC + off)[start : start + n]
    assert len(on) == len(off) == n, "not enough templated texts"
    rows = [{"text": t, "on_topic": True} for t in on] + [{"text": t, "on_topic": False} for t in off]
    return rows[::2] + rows[1::2]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def request(
    rid: str,
    text: str | None,
    verdict: str,
    score: float | None = 0.0,
    threshold: float | None = 0.1,
    **extra: Any,
) -> dict[str, Any]:
    """A request record as the gate writes it."""
    blocked = verdict != "passed"
    record: dict[str, Any] = {
        "id": rid,
        "time": "2025-01-01T00:00:00.000+00:00",
        "text": text,
        "context": None,
        "verdict": verdict,
        "layer": "similarity",
        "score": score,
        "threshold": threshold,
        "similarity_score": score,
        "classifier_score": None,
        "used_context": False,
        "upstream": {"status": None if blocked else 200, "usage": None, "error": None},
        "reply": DEFAULT_REFUSAL if blocked else "Sure, here you go.",
        "llm_refused": None if blocked else False,
    }
    record.update(extra)
    return record


def feedback(rid: str, on_topic: bool) -> dict[str, Any]:
    return {"type": "feedback", "id": rid, "on_topic": on_topic, "time": "t", "source": "human"}


def by_text(labels: list[Label]) -> dict[str, tuple[bool, str]]:
    return {label.text: (label.on_topic, label.source) for label in labels}


# --- labels --------------------------------------------------------------------------------------


def test_labels_from_a_log_with_feedback_and_layer_2(tmp_path: Path) -> None:
    log = write_jsonl(
        tmp_path / "interactions.jsonl",
        [
            request("gr-1", "rent question", "passed", 0.5),
            request("gr-2", "weather question", "passed", 0.3, llm_refused=True, reply="I'm sorry..."),
            request("gr-3", "blocked but human says on", "blocked", -0.5),
            feedback("gr-3", False),
            feedback("gr-3", True),  # the last feedback for an id wins
            feedback("gr-404", True),
            request("gr-4", None, "unjudged", 0.0),
            request("gr-5", "server broke", "passed", 0.6, upstream={"status": 502, "error": None}),
            request("gr-6", "timed out", "passed", 0.6, upstream={"status": None, "error": "timeout"}),
            request("gr-7", "and the second?", "passed", 0.6, used_context=True),
            request("gr-8", "no reply seen", "passed", 0.6, reply=None, llm_refused=None),
            request("gr-9", "   ", "blocked", -0.9),
            request("gr-10", "hello", "unjudged", score=None, threshold=None),
            {"type": "reload", "path": "x.onnx"},
        ],
    )
    result = read_labels([log])
    assert by_text(result.labels) == {
        "rent question": (True, "weak"),
        "weather question": (False, "layer2"),
        "blocked but human says on": (True, "human"),
    }
    assert result.skipped == {
        "feedback_unknown_id": 1,
        "no_text": 2,
        "not_a_request": 1,
        "reply_unknown": 1,
        "unjudged": 1,
        "upstream_error": 2,
        "with_context": 1,
    }
    assert result.sources() == {"human": 1, "layer2": 1, "weak": 1}
    assert [label.weight for label in result.labels] == [0.3, 0.8, 1.0]


def test_weak_labels_keep_the_farthest_half_on_each_side(tmp_path: Path) -> None:
    records = [
        request(f"gr-b{i}", f"blocked {i}", "blocked", 0.1 - m) for i, m in enumerate([0.1, 0.2, 0.3, 0.4])
    ]
    records += [request(f"gr-p{i}", f"passed {i}", "passed", 0.1 + m) for i, m in enumerate([0.05, 0.5])]
    # Shadow mode: would-block counts like blocked, and an LLM answer to it does not make it on topic.
    records += [request("gr-w", "shadow far", "would-block", -2.0, llm_refused=False, reply="Sure.")]
    result = read_labels([write_jsonl(tmp_path / "log.jsonl", records)])
    assert by_text(result.labels) == {
        "blocked 2": (False, "weak"),
        "blocked 3": (False, "weak"),
        "shadow far": (False, "weak"),
        "passed 1": (True, "weak"),
    }
    assert result.skipped == {"near_threshold": 3}


def test_weak_labels_are_judged_per_scale(tmp_path: Path) -> None:
    # A classifier's probabilities and layer 1's scores are different scales: each has its own median.
    records = [request("gr-s1", "sim near", "passed", 0.12), request("gr-s2", "sim far", "passed", 0.5)]
    records += [
        request("gr-c1", "clf near", "passed", 0.55, 0.5, classifier_score=0.55),
        request("gr-c2", "clf far", "passed", 0.99, 0.5, classifier_score=0.99),
    ]
    result = read_labels([write_jsonl(tmp_path / "log.jsonl", records)])
    assert sorted(by_text(result.labels)) == ["clf far", "sim far"]


def test_refusals_in_older_logs_are_read_from_the_reply(tmp_path: Path) -> None:
    record = request("gr-1", "capital of Peru?", "passed", 0.9, reply=f'"{DEFAULT_REFUSAL}"')
    del record["llm_refused"]
    result = read_labels([write_jsonl(tmp_path / "log.jsonl", [record])])
    assert by_text(result.labels) == {"capital of Peru?": (False, "layer2")}


def test_rotated_backups_are_read_oldest_first(tmp_path: Path) -> None:
    log = tmp_path / "interactions.jsonl"
    write_jsonl(log.with_name("interactions.jsonl.1"), [{"text": "tell me a joke", "on_topic": True}])
    write_jsonl(log, [{"text": "tell  me a joke", "on_topic": False}])
    result = read_labels([log])
    # Same text once whitespace is collapsed; both human, so the newer file's label wins.
    assert by_text(result.labels) == {"tell  me a joke": (False, "human")}
    assert (result.duplicates, result.conflicts) == (1, 1)


def test_a_human_label_overrides_layer_2_and_weak_labels(tmp_path: Path) -> None:
    labelled = write_jsonl(tmp_path / "labels.jsonl", [{"text": "Buy a house?", "on_topic": True}])
    log = write_jsonl(
        tmp_path / "log.jsonl",
        [
            request("gr-1", "Buy a house?", "passed", 0.5, llm_refused=True),
            request("gr-2", "Buy a house?", "blocked", -0.5),
            request("gr-3", "buy a house?", "blocked", -0.5),  # case is kept: another text
        ],
    )
    result = read_labels([labelled, log])
    assert by_text(result.labels) == {"Buy a house?": (True, "human"), "buy a house?": (False, "weak")}
    assert (result.duplicates, result.conflicts) == (2, 1)


def test_deduplicate_prefers_weight_then_the_most_recent() -> None:
    labels = [
        Label("a", True, "layer2", 5),
        Label("a", False, "weak", 9),
        Label("b", True, "weak", 1),
        Label("b", False, "weak", 2),
        Label("c", True, "weak", 3),
        Label(" c ", True, "weak", 4),
    ]
    result = deduplicate(labels)
    assert [(x.text, x.on_topic, x.order) for x in result.labels] == [
        ("b", False, 2),
        (" c ", True, 4),
        ("a", True, 5),
    ]
    assert (result.duplicates, result.conflicts) == (3, 2)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "", "on_topic": true}', '"text" must be a non-empty string'),
        ('{"text": "rent", "on_topic": "yes"}', '"on_topic" must be true or false'),
        ('{"type": "feedback", "id": "gr-1", "on_topic": null}', '"on_topic" must be true or false'),
        ("[1, 2]", "expected a JSON object, got list"),
        ("{nope}\n", "invalid JSON"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "rent", "on_topic": true}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        read_labels([path])
    assert (info.value.path, info.value.line) == (str(path), 3)


def test_a_torn_last_line_is_skipped_and_a_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"text": "rent", "on_topic": true}\n{"text": "ha', encoding="utf-8")
    assert [x.text for x in read_labels([path]).labels] == ["rent"]
    with pytest.raises(DataError, match="no such file"):
        read_labels([tmp_path / "missing.jsonl"])


def test_a_workers_log_named_beside_its_own_log_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "interactions.jsonl"
    path.write_text('{"text": "rent", "on_topic": true}\n', encoding="utf-8")
    worker = tmp_path / "interactions.w0.jsonl"  # what ``guardrail serve --workers 2`` writes
    worker.write_text('{"text": "weather", "on_topic": false}\n', encoding="utf-8")
    # The log's name already takes in its workers' files: naming one too (a shell glob does) adds nothing.
    for named in ([path], [path, worker], [worker, path, path]):
        found = read_labels(named)
        assert sorted(x.text for x in found.labels) == ["rent", "weather"]
        assert found.duplicates == 0


# --- splits --------------------------------------------------------------------------------------


def test_stratified_split_is_seeded_and_keeps_the_label_balance() -> None:
    on_topic = np.array([True] * 50 + [False] * 150)
    train, held = stratified_split(on_topic, 0.2, seed=3)
    assert (on_topic[held].sum(), (~on_topic[held]).sum()) == (10, 30)
    assert sorted([*train, *held]) == list(range(200))
    _, held_again = stratified_split(on_topic, 0.2, seed=3)
    assert np.array_equal(held, held_again)
    assert not np.array_equal(held, stratified_split(on_topic, 0.2, seed=4)[1])


def test_stratified_folds_deal_each_label_evenly() -> None:
    on_topic = np.array([True] * 23 + [False] * 40)
    fold = stratified_folds(on_topic, 5, seed=0)
    for k in range(5):
        assert on_topic[fold == k].sum() in (4, 5)
        assert (~on_topic[fold == k]).sum() == 8


def test_measure_block_rate_at_target_pass() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.65, 0.95])
    truth = np.array([True, True, True, True, False, False, False, False])
    metrics = measure("m", scores, truth, 0.75)  # passes 3 of 4 on-topic: threshold 0.7
    assert metrics.block_rate == 0.75
    assert metrics.auroc == pytest.approx(11 / 16)


# --- writing -------------------------------------------------------------------------------------


def test_write_classifier_replaces_both_files_and_leaves_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "classifiers" / "estate.onnx"
    write_classifier(out, b"old model", {"threshold": 0.1})
    write_classifier(out, b"new model", {"threshold": 0.2})
    assert out.read_bytes() == b"new model"
    assert json.loads(out.with_suffix(".json").read_text())["threshold"] == 0.2
    assert sorted(p.name for p in out.parent.iterdir()) == ["estate.json", "estate.onnx"]


def test_write_classifier_failure_is_a_model_error_without_temporaries(tmp_path: Path) -> None:
    out = tmp_path / "estate.onnx"
    out.with_suffix(".json").mkdir()  # the card's place is taken by a directory: its rename fails
    with pytest.raises(ModelError, match=f"cannot write the classifier {out}"):
        write_classifier(out, b"model", {"threshold": 0.1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["estate.json"]


# --- retrain -------------------------------------------------------------------------------------


def test_retrain_writes_a_loadable_model_and_its_card(guard: Guard, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "labelled.jsonl", estate_rows(40))
    out = tmp_path / "estate.onnx"
    result = retrain(guard, [data], out, seed=0, target_pass=0.9)
    assert result.promoted and result.reason is None
    card = json.loads(out.with_suffix(".json").read_text())
    assert card == result.card
    assert card["format"] == CARD_FORMAT
    assert card["encoder"] == guard.encoder.id
    assert card["features"] == ["embedding", *FEATURE_NAMES]
    assert card["n_features"] == guard.encoder.dim + len(FEATURE_NAMES)
    assert (card["target_pass"], card["seed"]) == (0.9, 0)
    assert card["scenario"] == {
        "name": "real_estate",
        "title": guard.document.title,
        "digest": guard.document.digest,
    }
    assert card["data"] == {
        "examples": 80,
        "on_topic": 40,
        "off_topic": 40,
        "train": 64,
        "holdout": 16,
        "duplicates": 0,
        "conflicts": 0,
        "skipped": {},
    }
    assert card["label_sources"]["human"] == {"count": 80, "weight": 1.0}
    assert card["label_sources"]["weak"] == {"count": 0, "weight": 0.3}
    assert card["metrics"]["previous"]["name"] == "layer 1"
    assert card["metrics"]["holdout"]["auroc"] > 0.9
    assert card["model"]  # whatever learning.fit returned, described
    assert card["metrics"]["forced"] is False
    assert card["created"].endswith("+00:00")
    assert len(card["trained_on"]) == 80 * 12
    classifier = Classifier.load(out, guard.encoder.id, guard.encoder.dim)
    assert classifier.threshold == card["threshold"] == result.threshold
    texts = [row["text"] for row in estate_rows(40)]
    features = guard.similarity.evaluate(guard.encoder.encode(texts)).features
    p = classifier.predict(features)
    truth = np.array([row["on_topic"] for row in estate_rows(40)])
    assert p[truth].mean() > 0.8 > 0.2 > p[~truth].mean()


def test_retrain_is_deterministic_for_a_seed(guard: Guard, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "labelled.jsonl", estate_rows(30))
    first, second, other = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    retrain(guard, [data], first, seed=7)
    retrain(guard, [data], second, seed=7)
    retrain(guard, [data], other, seed=8)
    assert first.read_bytes() == second.read_bytes()
    cards = [json.loads(p.with_suffix(".json").read_text()) for p in (first, second, other)]
    assert cards[0]["threshold"] == cards[1]["threshold"]
    assert cards[0]["model_sha256"] == cards[1]["model_sha256"]
    session = ort.InferenceSession(str(first), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1] == cards[0]["n_features"]


def test_retrain_needs_enough_of_each_label(guard: Guard, tmp_path: Path) -> None:
    rows = estate_rows(30)
    few = [row for row in rows if row["on_topic"]][: MIN_EXAMPLES - 1] + [
        r for r in rows if not r["on_topic"]
    ]
    data = write_jsonl(tmp_path / "few.jsonl", few)
    with pytest.raises(DataError, match=f"19 on-topic and 30 off-topic examples.*at least {MIN_EXAMPLES}"):
        retrain(guard, [data], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(DataError, match="larger --holdout"):
        retrain(
            guard, [write_jsonl(tmp_path / "ok.jsonl", estate_rows(20))], tmp_path / "m.onnx", holdout=0.05
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"holdout": 0.0}, "holdout must be in"),
        ({"target_pass": 1.0}, "target_pass must be in"),
        ({"out": "m.json"}, "must end in .onnx"),
    ],
)
def test_retrain_refuses_bad_options(
    guard: Guard, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    out = tmp_path / kwargs.pop("out", "m.onnx")
    with pytest.raises(ConfigError, match=message):
        retrain(guard, [tmp_path / "unread.jsonl"], out, **kwargs)


def test_an_unloadable_current_model_is_noted_and_layer_1_compared(guard: Guard, tmp_path: Path) -> None:
    out = tmp_path / "estate.onnx"
    out.write_bytes(b"not onnx")
    data = write_jsonl(tmp_path / "labelled.jsonl", estate_rows(30))
    result = retrain(guard, [data], out)
    assert result.previous.name == "layer 1"
    assert result.previous_note is not None and "compared with layer 1 instead" in result.previous_note
    assert result.promoted
    assert Classifier.load(out, guard.encoder.id, guard.encoder.dim).threshold == result.threshold


def test_the_comparison_leaves_out_what_the_current_model_was_trained_on(
    guard: Guard, tmp_path: Path
) -> None:
    out = tmp_path / "estate.onnx"
    first = write_jsonl(tmp_path / "first.jsonl", estate_rows(30))
    assert retrain(guard, [first], out).previous.name == "layer 1"
    # Twice as much data: the held-back examples the current model never saw are enough to compare on.
    more = retrain(guard, [write_jsonl(tmp_path / "more.jsonl", estate_rows(60))], out)
    assert more.previous.name == "estate"
    assert more.evaluated_on == "human and layer-2 labels, not seen by estate"
    assert more.previous_note is None
    # The same data again: every held-back example was seen, and the summary says what that means.
    again = retrain(guard, [write_jsonl(tmp_path / "again.jsonl", estate_rows(60))], out)
    assert again.previous_note == (
        "estate was trained on most of the held-back examples: the comparison favours it"
    )


def test_progress_bars_go_to_stderr_when_asked(
    guard: Guard, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "labelled.jsonl", estate_rows(20))
    retrain(guard, [data], tmp_path / "quiet.onnx")
    assert capsys.readouterr().err == ""
    retrain(guard, [data], tmp_path / "loud.onnx", progress=True)
    err = capsys.readouterr().err
    assert "embedding: 100%" in err
    assert "40/40" in err
    assert "fitting: 100%" in err
    assert "7/7" in err  # five folds, the candidate and the final model


def test_retrain_without_the_train_extra_says_what_to_install(
    guard: Guard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "skl2onnx", None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r"skl2onnx is missing\): pip install 'guardrail\[train\]'"):
        retrain(guard, [tmp_path / "unread.jsonl"], tmp_path / "m.onnx")
