from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_training import estate_rows, feedback, request, write_jsonl

from guardrail.cli import main

from commands import run_cli
from samples import REPORT_KEYS


def retrain_args(scenario: Path, out: Path, *logs: Path) -> list[str]:
    return ["retrain", "--scenario", str(scenario), "--out", str(out), "--logs", *map(str, logs)]


def eval_args(scenario: Path, data: Path, classifier: Path, *extra: str) -> list[str]:
    return ["eval", "--scenario", str(scenario), "--data", str(data), "--classifier", str(classifier), *extra]


def flipped_log(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A log whose confident decisions are all wrong: on-topic texts blocked, off-topic ones passed."""
    records = [
        request(f"gr-{i:024x}", row["text"], "blocked", -1.0)
        if row["on_topic"]
        else request(f"gr-{i:024x}", row["text"], "passed", 1.0)
        for i, row in enumerate(rows)
    ]
    return write_jsonl(path, records)


def corrupted(tmp_path: Path) -> tuple[Path, Path]:
    """New human labels, and a log of the same kind of messages whose weak labels are all flipped."""
    pool = estate_rows(120, start=40)
    humans = write_jsonl(tmp_path / "humans.jsonl", pool[::8])
    log = flipped_log(tmp_path / "interactions.jsonl", [row for i, row in enumerate(pool) if i % 8])
    return humans, log


@pytest.fixture
def promoted(cache_env: Path, real_estate_path: Path, tmp_path: Path) -> Path:
    """A good classifier, trained on 40 + 40 labelled rows and promoted over layer 1."""
    data = write_jsonl(tmp_path / "good.jsonl", estate_rows(40))
    out = tmp_path / "classifiers" / "estate.onnx"
    assert main([*retrain_args(real_estate_path, out, data), "--quiet"]) == 0
    return out


# --- retrain -------------------------------------------------------------------------------------


def test_retrain_prints_a_summary_and_writes_model_and_card(
    cache_env: Path, real_estate_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "good.jsonl", estate_rows(40))
    out = tmp_path / "classifiers" / "estate.onnx"
    assert main(retrain_args(real_estate_path, out, data)) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # stderr is not a terminal here: no progress bars
    out_text = captured.out
    assert "examples   80: 40 on-topic, 40 off-topic (labels: human 80, layer2 0, weak 0)" in out_text
    assert re.search(r"new model\s+AUROC \d\.\d{4}, blocks [\d.]+% of off-topic", out_text)
    assert re.search(r"layer 1\s+AUROC \d\.\d{4}, blocks [\d.]+% of off-topic", out_text)
    assert f"wrote      {out} and its card {out.with_suffix('.json')}" in out_text
    assert sorted(p.name for p in out.parent.iterdir()) == ["estate.json", "estate.onnx"]


def test_retrain_from_an_interaction_log_with_feedback(
    cache_env: Path, real_estate_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = estate_rows(30)
    records: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        rid = f"gr-{i:024x}"
        # Layer 1 got every fifth one wrong; a human corrected it.
        wrong = i % 5 == 0
        passed = row["on_topic"] != wrong
        records.append(request(rid, row["text"], "passed" if passed else "blocked", 0.5 if passed else -0.5))
        if wrong:
            records.append(feedback(rid, row["on_topic"]))
    log = write_jsonl(tmp_path / "interactions.jsonl", records)
    out = tmp_path / "estate.onnx"
    assert main(retrain_args(real_estate_path, out, log)) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["data"]["examples"] == 60
    assert card["label_sources"]["human"]["count"] == 12
    assert card["label_sources"]["weak"]["count"] == 48
    assert "labels: human 12, layer2 0, weak 48" in capsys.readouterr().out


def test_retrain_refuses_a_worse_model_and_keeps_the_current_one(
    promoted: Path, real_estate_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, card = promoted.read_bytes(), promoted.with_suffix(".json").read_bytes()
    stamp = promoted.stat().st_mtime_ns
    capsys.readouterr()
    humans, log = corrupted(tmp_path)
    args = [*retrain_args(real_estate_path, promoted, humans, log), "--holdout", "0.3"]
    assert main(args) == 1
    captured = capsys.readouterr()
    reason = captured.err
    assert reason.startswith("guardrail: not promoted: the new model is worse than estate on the ")
    numbers = re.search(r"AUROC (\d\.\d{4}) against (\d\.\d{4})", reason)
    assert numbers and float(numbers[1]) < float(numbers[2]) - 0.01
    assert f"{promoted} is unchanged" in reason
    assert "--force" in reason
    assert "compared on human and layer-2 labels, at 95% on-topic passed" in captured.out
    assert promoted.read_bytes() == model
    assert promoted.with_suffix(".json").read_bytes() == card
    assert promoted.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in promoted.parent.iterdir()) == ["estate.json", "estate.onnx"]


def test_retrain_force_promotes_a_worse_model(
    promoted: Path, real_estate_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = promoted.read_bytes()
    humans, log = corrupted(tmp_path)
    args = [*retrain_args(real_estate_path, promoted, humans, log), "--holdout", "0.3", "--force"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "forced     the new model is worse than estate" in out
    assert promoted.read_bytes() != model
    card = json.loads(promoted.with_suffix(".json").read_text())
    assert card["metrics"]["forced"] is True
    assert card["metrics"]["previous"]["name"] == "estate"
    assert card["label_sources"]["weak"]["count"] == 210


def test_retrain_without_enough_data_exits_2(
    cache_env: Path, real_estate_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "few.jsonl", estate_rows(10))
    out = tmp_path / "estate.onnx"
    assert main(retrain_args(real_estate_path, out, data)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"guardrail: error: {data}: not enough labelled data: 10 on-topic and 10 off-topic")
    assert not out.exists()


def test_retrain_bad_row_exits_2_naming_file_and_line(
    cache_env: Path, real_estate_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "rent", "on_topic": true}\n{"text": "x", "on_topic": 1}\n', encoding="utf-8")
    assert main(retrain_args(real_estate_path, tmp_path / "m.onnx", data)) == 2
    assert capsys.readouterr().err.startswith(f"guardrail: error: {data}:2: ")


# --- eval --classifier ---------------------------------------------------------------------------


@pytest.fixture
def test_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "test.jsonl", estate_rows(20, start=100))


def test_eval_with_a_classifier_json(
    promoted: Path,
    real_estate_path: Path,
    test_data: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(eval_args(real_estate_path, test_data, promoted, "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == [*REPORT_KEYS, "classifier"]
    card = json.loads(promoted.with_suffix(".json").read_text())
    assert result["threshold"] == card["threshold"]
    assert result["classifier"]["threshold"] == card["threshold"]
    assert result["classifier"]["name"] == "estate"
    assert (result["n_on"], result["n_off"]) == (20, 20)
    assert result["auroc"] > 0.95
    assert result["pass_rate"] >= 0.8
    # Without the classifier the threshold is layer 1's, and there is no classifier key.
    assert main(["eval", "--json", "--scenario", str(real_estate_path), "--data", str(test_data)]) == 0
    layer1 = json.loads(capsys.readouterr().out)
    assert list(layer1) == REPORT_KEYS
    assert layer1["threshold"] != result["threshold"]


def test_eval_with_a_classifier_text(
    promoted: Path, real_estate_path: Path, test_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = eval_args(real_estate_path, test_data, promoted)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"classifier {promoted} (layer 3 decides" in out
    assert re.search(r"threshold  \+0\.\d{4} \(the classifier's\)", out)


def test_eval_with_a_classifier_for_another_encoder_exits_2(
    promoted: Path, real_estate_path: Path, test_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card_file = promoted.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card_file.write_text(json.dumps({**card, "encoder": "another/model@0123456789abcdef"}))
    args = eval_args(real_estate_path, test_data, promoted)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "was trained on the embeddings of another/model@0123456789abcdef" in captured.err


# --- the hidden path, as a user runs it ----------------------------------------------------------


def test_subprocess_retrain_then_eval(cache_env: Path, real_estate_path: Path, tmp_path: Path) -> None:
    labelled = write_jsonl(tmp_path / "labelled.jsonl", estate_rows(60))
    test = write_jsonl(tmp_path / "test.jsonl", estate_rows(20, start=100))
    out = tmp_path / "m.onnx"
    trained = run_cli(
        "retrain",
        "--logs",
        str(labelled),
        "--scenario",
        str(real_estate_path),
        "--out",
        str(out),
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr
    assert "Traceback" not in trained.stderr
    evaluated = run_cli(*eval_args(real_estate_path, test, out, "--json"), timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert list(result)[: len(REPORT_KEYS)] == REPORT_KEYS
    assert result["auroc"] > 0.95
