from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from guardrail import workers
from guardrail.cli import main
from guardrail.guard import Guard
from guardrail.models import DEFAULT_MODEL, content_key, resolve_model
from guardrail.settings import Settings, cores
from guardrail.workers import ServeOptions

from classifiers import write_classifier
from commands import run_cli
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


# --- serve ---------------------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[uvicorn.Config]]:
    """Stand in for ``uvicorn.Server.run``: keep the config it was given instead of serving."""
    configs: list[uvicorn.Config] = []

    def run(self: uvicorn.Server, sockets: object = None) -> None:
        configs.append(self.config)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    yield configs
    for config in configs:
        config.app.state.gate.batcher.close()


def serve_args(real_estate_path: Path, *extra: str) -> list[str]:
    return ["serve", "--scenario", str(real_estate_path), "--upstream", "http://127.0.0.1:9", *extra]


def test_serve_builds_the_app_from_flags(
    cache_env: Path,
    real_estate_path: Path,
    served: list[uvicorn.Config],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        serve_args(
            real_estate_path,
            "--host", "0.0.0.0",
            "--port", "9123",
            "--mode", "shadow",
            "--refusal", "Property questions only, please.",
            "--threshold", "0.2",
            "--log-path", "",
        )
    )  # fmt: skip
    assert code == 0
    [config] = served
    assert (config.host, config.port) == ("0.0.0.0", 9123)
    assert config.log_level == "info"
    gate = config.app.state.gate
    assert gate.mode == "shadow"
    assert gate.refusal == "Property questions only, please."
    assert gate.log is None
    assert gate.scenario == "real_estate"
    assert gate.guard.threshold == 0.2
    proxy = config.app.state.proxy
    assert proxy.settings.upstream == "http://127.0.0.1:9"
    assert proxy.upstream.target(b"/v1/models", b"") == "http://127.0.0.1:9/v1/models"
    err = capsys.readouterr().err
    assert "guarding http://127.0.0.1:9 with" in err
    assert "mode shadow" in err
    assert "base URL http://0.0.0.0:9123/v1" in err
    assert "log off" in err


def test_serve_defaults(
    cache_env: Path, real_estate_path: Path, served: list[uvicorn.Config], tmp_path: Path
) -> None:
    log = tmp_path / "i.jsonl"
    assert main(serve_args(real_estate_path, "--log-path", str(log))) == 0
    [config] = served
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    gate = config.app.state.gate
    assert gate.mode == "enforce"
    assert gate.log is not None
    assert gate.log.path == log
    assert not log.exists()  # the log opens with the app's lifespan, not before


def test_serve_loads_a_classifier_from_its_flag(
    cache_env: Path, real_estate_path: Path, served: list[uvicorn.Config], tmp_path: Path
) -> None:
    guard = Guard.load(real_estate_path, cache_dir=cache_env)
    write_classifier(tmp_path / "bot.onnx", guard, threshold=0.3)
    assert (
        main(serve_args(real_estate_path, "--log-path", "", "--classifier", str(tmp_path / "bot.onnx"))) == 0
    )
    [config] = served
    classifier = config.app.state.gate.guard.classifier
    assert classifier is not None
    assert (classifier.name, classifier.threshold) == ("bot", 0.3)


def test_serve_merges_flags_environment_and_toml(
    cache_env: Path,
    real_estate_path: Path,
    served: list[uvicorn.Config],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "bots").mkdir()
    (tmp_path / "bots" / "estate.md").write_bytes(real_estate_path.read_bytes())
    config_file = tmp_path / "guardrail.toml"
    config_file.write_text(
        'scenario = "bots/estate.md"\n'
        'upstream = "https://llm.example.com/v1"\n'
        'host = "10.1.2.3"\n'
        "port = 9001\n"
        'mode = "shadow"\n'
        'refusal = "From the file."\n'
        'log_path = "logs/i.jsonl"\n',
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path.parent)  # relative paths follow the file, not the working directory
    monkeypatch.setenv("GUARDRAIL_PORT", "9002")
    monkeypatch.setenv("GUARDRAIL_REFUSAL", "From the environment.")
    assert main(["serve", "--config", str(config_file), "--mode", "enforce"]) == 0
    [config] = served
    assert config.host == "10.1.2.3"  # the file
    assert config.port == 9002  # the environment beats the file
    gate = config.app.state.gate
    assert gate.mode == "enforce"  # the flag beats the file
    assert gate.refusal == "From the environment."
    assert gate.guard.document.path == str(tmp_path / "bots" / "estate.md")
    assert gate.scenario == "estate"
    assert gate.log.path == tmp_path / "logs" / "i.jsonl"
    assert config.app.state.proxy.settings.upstream == "https://llm.example.com/v1"


def test_serve_reads_guardrail_config(
    cache_env: Path,
    real_estate_path: Path,
    served: list[uvicorn.Config],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config_file = tmp_path / "guardrail.toml"
    config_file.write_text(
        f"scenario = {json.dumps(str(real_estate_path))}\n"
        'upstream = "http://127.0.0.1:9"\nport = 9555\nlog_path = ""\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("GUARDRAIL_CONFIG", str(config_file))
    assert main(["serve"]) == 0
    [config] = served
    assert config.port == 9555
    assert config.app.state.gate.log is None


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["serve", "--upstream", "http://127.0.0.1:9"], "no scenario document: give --scenario"),
        (["serve", "--scenario", "estate.md"], "no upstream: give --upstream"),
        (["serve"], "no scenario document"),
    ],
)
def test_serve_without_scenario_or_upstream_exits_2(
    served: list[uvicorn.Config], capsys: pytest.CaptureFixture[str], args: list[str], missing: str
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"guardrail: error: {missing}")
    assert err.count("\n") == 1
    assert served == []


def test_serve_rejects_a_bad_mode(served: list[uvicorn.Config], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--mode", "block", "--upstream", "http://127.0.0.1:9"])
    assert info.value.code == 2
    assert "invalid choice: 'block'" in capsys.readouterr().err
    assert served == []


def test_serve_bad_toml_exits_2(
    served: list[uvicorn.Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "guardrail.toml"
    config_file.write_text('upstream = "http://127.0.0.1:9"\nport = \n', encoding="utf-8")
    assert main(["serve", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"guardrail: error: {config_file}: not valid TOML")
    assert err.count("\n") == 1
    assert served == []


def test_serve_unknown_toml_key_exits_2(
    served: list[uvicorn.Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "guardrail.toml"
    config_file.write_text("prot = 9000\n", encoding="utf-8")
    assert main(["serve", "--config", str(config_file)]) == 2
    assert capsys.readouterr().err == f"guardrail: error: {config_file}: unknown setting(s): prot\n"


def test_serve_bad_environment_value_exits_2(
    served: list[uvicorn.Config], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GUARDRAIL_PORT", "http")
    assert main(["serve", "--upstream", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == ("guardrail: error: GUARDRAIL_PORT: port='http' is not a valid int\n")


def test_serve_bad_upstream_exits_2(
    served: list[uvicorn.Config], real_estate_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--scenario", str(real_estate_path), "--upstream", "localhost:8080"]) == 2
    assert "upstream must be an http:// or https:// URL" in capsys.readouterr().err
    assert served == []


def test_serve_missing_scenario_file_exits_2(
    cache_env: Path, served: list[uvicorn.Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "--scenario", str(tmp_path / "nope.md"), "--upstream", "http://127.0.0.1:9"])
    assert code == 2
    assert "nope.md" in capsys.readouterr().err
    assert served == []


@pytest.fixture
def supervised(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Settings, ServeOptions]]:
    """Stand in for ``serve_workers``: keep what it was given instead of starting processes."""
    calls: list[tuple[Settings, ServeOptions]] = []

    def serve_workers(settings: Settings, options: ServeOptions) -> int:
        calls.append((settings, options))
        return 0

    monkeypatch.setattr(workers, "serve_workers", serve_workers)
    return calls


def test_serve_workers_flag_starts_the_supervisor(
    real_estate_path: Path,
    served: list[uvicorn.Config],
    supervised: list[tuple[Settings, ServeOptions]],
    tmp_path: Path,
) -> None:
    log = tmp_path / "i.jsonl"
    args = serve_args(real_estate_path, "--workers", "2", "--log-path", str(log), "--log-level", "warning")
    assert main([*args, "--access-log"]) == 0
    [(settings, options)] = supervised
    assert settings.workers == 2
    assert settings.log_path == log  # each worker derives its own file from it
    assert settings.encoders == max(1, cores() // 2)  # the cores shared out
    assert options == ServeOptions(log_level="warning", access_log=True)
    assert served == []  # the parent serves nothing itself


def test_serve_workers_keep_encoder_workers_that_were_chosen(
    real_estate_path: Path,
    served: list[uvicorn.Config],
    supervised: list[tuple[Settings, ServeOptions]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config_file = tmp_path / "guardrail.toml"
    config_file.write_text("workers = 3\nencoder_workers = 2\n", encoding="utf-8")  # = the default
    assert main([*serve_args(real_estate_path), "--config", str(config_file)]) == 0
    monkeypatch.setenv("GUARDRAIL_ENCODER_WORKERS", "5")
    monkeypatch.setenv("GUARDRAIL_WORKERS", "4")
    assert main(serve_args(real_estate_path)) == 0
    assert [(s.workers, s.encoders) for s, _ in supervised] == [(3, 2), (4, 5)]


def test_serve_one_worker_is_the_single_process_server(
    cache_env: Path,
    real_estate_path: Path,
    served: list[uvicorn.Config],
    supervised: list[tuple[Settings, ServeOptions]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert main(serve_args(real_estate_path, "--workers", "1", "--log-path", "")) == 0
    assert supervised == []
    [config] = served
    assert config.app.state.proxy.settings.encoders == 2  # the default, unchanged
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # no multiprocess directory


def test_serve_zero_workers_exits_2(
    served: list[uvicorn.Config],
    supervised: list[tuple[Settings, ServeOptions]],
    real_estate_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(serve_args(real_estate_path, "--workers", "0")) == 2
    assert capsys.readouterr().err == "guardrail: error: workers must be at least 1, got 0\n"
    assert (served, supervised) == ([], [])


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
