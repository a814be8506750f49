"""``guardrail report`` from the command line: a log in, one HTML page out, errors as exit code 2."""

from __future__ import annotations

from pathlib import Path

from test_training import request, write_jsonl

from commands import run_cli

BLOCKED = ["what's the weather in Paris tomorrow?", "will it rain in London this weekend?"]
PASSED = ["can I book a viewing of the flat on Maple Street?"]


def test_report_writes_a_page_and_says_what_is_in_it(tmp_path: Path, model_cache: Path) -> None:
    records = [request(f"gr-{i:024x}", text, "blocked", -0.5) for i, text in enumerate(BLOCKED)]
    records += [request(f"gr-{9:024x}", PASSED[0], "passed", 0.5)]
    log = write_jsonl(tmp_path / "interactions.jsonl", records)
    out = tmp_path / "report.html"
    done = run_cli("report", "--logs", str(log), "--out", str(out), "--cache-dir", str(model_cache))
    assert done.returncode == 0, done.stderr
    assert "3 requests, 2 blocked" in done.stdout
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lstrip().lower().startswith("<!doctype html>")
    assert "weather in Paris" in page


def test_report_on_a_missing_log_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    done = run_cli("report", "--logs", str(tmp_path / "nowhere.jsonl"), "--out", str(out))
    assert done.returncode == 2
    assert "nowhere.jsonl" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
