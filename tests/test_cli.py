from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from guardrail.cli import main
from guardrail.models import DEFAULT_MODEL, content_key, resolve_model

from samples import OFF_TOPIC, ON_TOPIC, REPORT_KEYS, VIEWING

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JSON_KEYS = ["text", "verdict", "allowed", "score", "threshold", "layer", "scenario"]


@pytest.fixture
def eval_data(tmp_path: Path) -> Path:
    rows = [{"text": t, "on_topic": True} for t in ON_TOPIC] + [
        {"text": t, "on_topic": False} for t in OFF_TOPIC
    ]
    path = tmp_path / "estate.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows[::2] + rows[1::2]) + "\n", encoding="utf-8")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardrail.cli", *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- check ---------------------------------------------------------------------------------------


def test_check_prints_verdict_score_threshold_and_scenario(
    cache_env: Path, real_estate_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "check",
            "--scenario",
            str(real_estate_path),
            "can I book a viewing this Saturday?",
            "tell me a joke",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    number = r"[+-]\d+\.\d{3}"
    on = re.fullmatch(
        rf"on-topic   score ({number})  threshold ({number})  can I book a viewing this Saturday\?", lines[0]
    )
    assert on, lines[0]
    assert float(on[1]) >= float(on[2])
    assert lines[1].strip() == f"nearest scenario: {VIEWING}"
    off = re.fullmatch(rf"off-topic  score ({number})  threshold ({number})  tell me a joke", lines[2])
    assert off, lines[2]
    assert float(off[1]) < float(off[2])
    assert lines[3].strip().startswith("nearest scenario: ")


def test_check_json(cache_env: Path, real_estate_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "check",
            "--json",
            "--scenario",
            str(real_estate_path),
            "can I book a viewing this Saturday?",
            "tell me a joke",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [list(row) for row in rows] == [JSON_KEYS, JSON_KEYS]
    viewing, joke = rows
    assert viewing["text"] == "can I book a viewing this Saturday?"
    assert (viewing["verdict"], viewing["allowed"]) == ("on-topic", True)
    assert (joke["verdict"], joke["allowed"]) == ("off-topic", False)
    assert viewing["layer"] == joke["layer"] == "similarity"
    assert viewing["scenario"] == VIEWING
    assert viewing["threshold"] == joke["threshold"]
    assert viewing["score"] >= viewing["threshold"] > joke["score"]


def test_check_reads_stdin(
    cache_env: Path,
    real_estate_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("how much is the deposit?\n\n   \nwhat's the capital of Peru\n")
    )
    assert main(["check", "--json", "--scenario", str(real_estate_path), "-"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["text"] for row in rows] == ["how much is the deposit?", "what's the capital of Peru"]
    assert [row["allowed"] for row in rows] == [True, False]


def test_check_cache_dir_flag(
    model_cache: Path, real_estate_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["check", "--json", "--cache-dir", str(model_cache), "--scenario", str(real_estate_path), "rent"]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["text"] == "rent"


def test_check_threshold_flag(
    cache_env: Path, real_estate_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "check",
            "--json",
            "--threshold",
            "0.95",
            "--scenario",
            str(real_estate_path),
            "can I book a viewing this Saturday?",
        ]
    )
    assert code == 0
    row = json.loads(capsys.readouterr().out)
    assert row["threshold"] == 0.95
    assert row["allowed"] is False


def test_check_threshold_from_the_environment(
    cache_env: Path,
    real_estate_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GUARDRAIL_THRESHOLD", "-0.5")
    assert main(["check", "--json", "--scenario", str(real_estate_path), "tell me a joke"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["threshold"] == -0.5
    assert row["allowed"] is True


def test_check_bad_target_pass_exits_2(
    cache_env: Path, real_estate_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--target-pass", "1.5", "--scenario", str(real_estate_path), "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "guardrail: error: target_pass must be in [0.5, 1), got 1.5\n"


def test_check_malformed_scenario_exits_2_naming_file_and_line(
    cache_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "bot.md"
    scenario.write_text("# Bot\nHelps.\n## Scenarios\n- one\n### Details\n", encoding="utf-8")
    assert main(["check", "--scenario", str(scenario), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"guardrail: error: {scenario}:5: unexpected heading")


def test_check_unknown_model_exits_2(
    cache_env: Path, real_estate_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--model", "not_a_model_anywhere", "--scenario", str(real_estate_path), "hi"]) == 2
    assert "model 'not_a_model_anywhere' is not a directory" in capsys.readouterr().err


def test_check_module_name_as_model_exits_2(cache_env: Path, real_estate_path: Path) -> None:
    assert main(["check", "--model", "os", "--scenario", str(real_estate_path), "hi"]) == 2


def test_check_needs_a_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", "hi"])
    assert info.value.code == 2
    assert "--scenario" in capsys.readouterr().err


# --- eval ----------------------------------------------------------------------------------------


def test_eval_json(
    cache_env: Path, real_estate_path: Path, eval_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--json", "--scenario", str(real_estate_path), "--data", str(eval_data)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    assert list(result) == REPORT_KEYS
    assert result["auroc"] > 0.9
    assert (result["n_on"], result["n_off"]) == (10, 10)
    assert 0.9 <= result["pass_rate"] <= 1.0
    assert result["block_rate"] >= 0.9
    assert 0 <= result["block_rate_at_pass_95"] <= 1
    assert 0 <= result["pass_rate_at_leak_5"] <= 1


def test_eval_text_report(
    cache_env: Path, real_estate_path: Path, eval_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--scenario", str(real_estate_path), "--data", str(eval_data)]) == 0
    out = capsys.readouterr().out
    assert "(Real Estate Agency Assistant)" in out
    assert f"data       {eval_data}: 10 on-topic, 10 off-topic" in out
    auroc = re.search(r"^AUROC\s+(\d\.\d{4})$", out, re.MULTILINE)
    assert auroc and float(auroc[1]) > 0.9
    assert re.search(r"threshold  [+-]\d\.\d{4} \(calibrated from the (document|background)\)", out)


def test_eval_says_when_the_threshold_was_set(
    cache_env: Path, real_estate_path: Path, eval_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--scenario", str(real_estate_path), "--data", str(eval_data), "--threshold", "0.05"]
    assert main(args) == 0
    assert "threshold  +0.0500 (as set):" in capsys.readouterr().out


def test_eval_plot_writes_a_png(
    cache_env: Path,
    real_estate_path: Path,
    eval_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    plot = tmp_path / "roc.png"
    code = main(["eval", "--scenario", str(real_estate_path), "--data", str(eval_data), "--plot", str(plot)])
    assert code == 0
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert f"ROC curve written to {plot}" in capsys.readouterr().out


def test_eval_malformed_data_exits_2_naming_file_and_line(
    cache_env: Path, real_estate_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"text": "rent", "on_topic": true}\n\n{"text": "joke", "on_topic": "no"}\n', encoding="utf-8"
    )
    assert main(["eval", "--scenario", str(real_estate_path), "--data", str(data)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"guardrail: error: {data}:3: ")
    assert "Traceback" not in captured.err


def test_eval_malformed_scenario_exits_2(
    cache_env: Path, eval_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "bot.md"
    scenario.write_text("# Bot\n## Scenarios\n- one\n- One\n", encoding="utf-8")
    assert main(["eval", "--scenario", str(scenario), "--data", str(eval_data)]) == 2
    assert capsys.readouterr().err.startswith(f"guardrail: error: {scenario}:4: duplicate bullet")


# --- export-model --------------------------------------------------------------------------------


def test_export_model_prints_the_cache_path(model_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export-model", "--cache-dir", str(model_cache)]) == 0
    out = capsys.readouterr().out
    key = content_key(resolve_model(DEFAULT_MODEL), model_cache)
    export_dir = model_cache / "models" / key
    assert out.startswith(f"{DEFAULT_MODEL}@{key}: exported to {export_dir} ")
    assert (export_dir / "model.onnx").is_file()
    cosine = re.search(r"min cosine to sentence-transformers: ([\d.]+)\)", out)
    assert cosine and float(cosine[1]) >= 0.999


def test_export_model_uses_guardrail_cache_dir(cache_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export-model"]) == 0
    assert f"exported to {cache_env / 'models'}" in capsys.readouterr().out


def test_export_model_out_writes_a_servable_directory(
    model_cache: Path, real_estate_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "served-model"
    assert main(["export-model", "--cache-dir", str(model_cache), "--out", str(out)]) == 0
    assert f"copied to {out}: serve it with --model {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.onnx", "tokenizer.json"]
    args = ["check", "--json", "--model", str(out), "--scenario", str(real_estate_path)]
    assert main([*args, "--cache-dir", str(tmp_path / "no-cache"), "can I book a viewing?"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["allowed"] is True
    assert row["scenario"] == VIEWING


# --- the real command, in a subprocess -----------------------------------------------------------


def test_subprocess_check_json(cache_env: Path, real_estate_path: Path) -> None:
    result = run_cli(
        "check",
        "--json",
        "--scenario",
        str(real_estate_path),
        "can I book a viewing this Saturday?",
        "what's the weather in Rome?",
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["allowed"] for row in rows] == [True, False]
    assert rows[0]["scenario"] == VIEWING


def test_subprocess_check_reads_stdin(cache_env: Path, real_estate_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guardrail.cli", "check", "--scenario", str(real_estate_path), "-"],
        input="when is my rent due?\nwho painted the Mona Lisa?\n",
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    verdicts = [line.split()[0] for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert verdicts == ["on-topic", "off-topic"]


def test_subprocess_malformed_data_exits_2_without_traceback(
    cache_env: Path, real_estate_path: Path, tmp_path: Path
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "rent", "on_topic": true}\n[1, 2]\n', encoding="utf-8")
    result = run_cli("eval", "--scenario", str(real_estate_path), "--data", str(data))
    assert result.returncode == 2
    assert f"{data}:2:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
