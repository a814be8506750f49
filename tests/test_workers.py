"""``guardrail serve --workers N``: real worker processes on one socket, their counts added up in one scrape.

The subprocess tests run the console script as users do, against the fake upstream of the session, on
the warm model cache; each worker loads its own model, so a server takes a second or two to start.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from guardrail import settings as settings_module
from guardrail.errors import ConfigError
from guardrail.guard import Guard
from guardrail.interactions import log_files, read_interactions, worker_log_path
from guardrail.settings import Settings
from guardrail.training import read_labels
from guardrail.workers import MULTIPROCESS_ENV, for_worker, metrics_directory

from samples import OFF_TOPIC, ON_TOPIC
from upstreams import FakeOpenAI, closed_port

ROOT = Path(__file__).resolve().parents[1]
GUARDRAIL = Path(sys.executable).with_name("guardrail")  # the console script, as installed
TOKEN = "admin-token-for-the-workers-test"
STARTUP = 60.0  # seconds: two model loads on a busy two-core machine, with room to spare


@dataclass
class Server:
    """A ``guardrail serve --workers N`` process, its stderr in a file."""

    process: subprocess.Popen[bytes]
    url: str
    stderr: Path
    log: Path  # the configured log path; the workers write beside it
    tmp: Path  # its TMPDIR, where its private metrics directory goes

    def output(self) -> str:
        return self.stderr.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: str, timeout: float = STARTUP) -> re.Match[str]:
        """The first match of ``pattern`` in its stderr, polling until it appears."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output())
            if match:
                return match
            assert self.process.poll() is None, f"the server exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.output()}"
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@contextlib.contextmanager
def serve(
    tmp_path: Path, model_cache: Path, upstream: str, *extra: str, workers: int = 2
) -> Iterator[Server]:
    port = closed_port()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log = tmp_path / "interactions.jsonl"
    stderr = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != MULTIPROCESS_ENV and not k.startswith("GUARDRAIL_")}
    env |= {"TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "GUARDRAIL_ADMIN_TOKEN": TOKEN}
    args = [
        str(GUARDRAIL), "serve",
        "--workers", str(workers),
        "--cache-dir", str(model_cache),
        "--scenario", str(ROOT / "scenarios" / "real_estate.md"),
        "--upstream", upstream,
        "--port", str(port),
        "--log-path", str(log),
        *extra,
    ]  # fmt: skip
    with stderr.open("wb") as err:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", stderr, log, tmp)
    try:
        yield server
    finally:
        if process.poll() is None:
            process.kill()  # the workers follow their parent (see guardrail/workers.py)
            process.wait(10)


def chat(url: str, text: str) -> httpx.Response:
    """One chat completion on a connection of its own, so the kernel may give it to any worker."""
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": text}]}
    response = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"connection": "close"}, timeout=20
    )
    assert response.status_code == 200, response.text
    return response


def prefix(id: str) -> str:
    """The per-process part of a record id: "gr-" and 12 hex digits."""
    return id[:15]


def drive(url: str, seen: set[str], wanted: int, start: int = 0, at_least: int = 16) -> list[str]:
    """Send chat completions, four at a time, until their ids have shown ``wanted`` processes in all
    (``seen`` gathers them) and at least ``at_least`` were sent; their ids, in order."""
    ids: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while len(ids) < at_least or len(seen) < wanted:
            assert len(ids) < 400, f"{len(ids)} requests all went to {seen}"
            texts = [text_for(start + len(ids) + i) for i in range(4)]
            for response in pool.map(lambda text: chat(url, text), texts):
                ids.append(response.headers["x-guardrail-id"])
                seen.add(prefix(ids[-1]))
    return ids


def text_for(n: int) -> str:
    """A distinct message, on topic for even ``n``: retraining merges repeated texts."""
    sample = ON_TOPIC if n % 2 == 0 else OFF_TOPIC
    return f"{sample[n // 2 % len(sample)]} (#{n})"


def scrape(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """One scrape of ``/metrics``: the samples called ``name``, by their labels."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def requests_counted(url: str, expected: int, timeout: float = 5.0) -> float:
    """The total of ``guardrail_requests_total`` in one scrape, once it reaches ``expected``.

    A passed request is counted when its reply has been relayed, so just after the client has it."""
    deadline = time.monotonic() + timeout
    while True:
        total = sum(scrape(url, "guardrail_requests_total").values())
        if total >= expected or time.monotonic() > deadline:
            return total
        time.sleep(0.02)


def ids_in(path: Path) -> list[str]:
    return [r["id"] for r in read_interactions([path]) if r.get("type") != "feedback"]


# --- a real server with two workers ----------------------------------------------------------------


@pytest.fixture
def warm_cache(model_cache: Path, guard: Guard) -> Path:
    """The model cache once a guard has loaded from it: its embeddings of the calibration texts are
    cached too (the first load computes them, 15 s in each worker on a busy two-core machine)."""
    return model_cache


def test_two_workers_add_up_in_one_scrape_and_stop_cleanly(
    tmp_path: Path, warm_cache: Path, fake_upstream: FakeOpenAI
) -> None:
    with serve(tmp_path, warm_cache, fake_upstream.url) as server:
        server.wait_for(r"2 workers serving")
        directory = Path(server.wait_for(r"\(multiprocess, (\S+)\)").group(1))
        assert directory.parent == server.tmp and directory.is_dir()  # private, fresh

        seen: set[str] = set()
        ids = drive(server.url, seen, wanted=2)  # until both workers have served some
        assert requests_counted(server.url, len(ids)) == len(ids)  # one scrape, both workers' counts

        # Feedback lands on whichever worker takes its connection, often not the one that logged the
        # request: retraining joins them by id across every worker's file.
        labelled = list(ids)
        for id in labelled:
            feedback = {"id": id, "on_topic": True}
            response = httpx.post(
                f"{server.url}/guardrail/feedback",
                json=feedback,
                headers={"authorization": f"Bearer {TOKEN}", "connection": "close"},
                timeout=10,
            )
            assert response.status_code == 202, response.text

        # SIGTERM while a streamed reply is under way: it finishes, then the workers stop.
        fake_upstream.pause = 1.0  # after the first word
        body = {"model": "gpt-test", "messages": [{"role": "user", "content": ON_TOPIC[0]}], "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=20) as streamed:
            ids.append(streamed.headers["x-guardrail-id"])
            chunks = streamed.iter_text()
            received = next(chunks)
            stopping = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            received += "".join(chunks)
        assert received.rstrip().endswith("data: [DONE]")
        assert server.process.wait(30) == 0
        stopped_in = time.monotonic() - stopping

    assert 1.0 <= stopped_in < 10
    output = server.output()
    assert "Traceback" not in output
    assert not directory.exists()
    assert list(server.tmp.glob("guardrail-metrics-*")) == []
    # Every line was flushed at the stop: one file per worker, one process prefix per file.
    files = [worker_log_path(server.log, i) for i in range(2)]
    per_file = [ids_in(file) for file in files]
    assert sorted(id for file_ids in per_file for id in file_ids) == sorted(ids)
    assert [len({prefix(id) for id in file_ids}) for file_ids in per_file] == [1, 1]
    assert {prefix(file_ids[0]) for file_ids in per_file} == seen
    assert not server.log.exists()
    # What `guardrail retrain --logs interactions.jsonl` reads: every worker's records and feedback.
    records = list(read_interactions(log_files(server.log)))
    assert len(records) == len(ids) + len(labelled)
    texts = {r["id"]: r["text"] for r in records if r.get("type") != "feedback"}
    human = [label for label in read_labels([server.log]).labels if label.source == "human"]
    assert sorted(label.text for label in human) == sorted(texts[id] for id in labelled)
    assert all(label.on_topic for label in human)


def test_a_killed_worker_is_restarted_in_its_slot_and_sighup_reaches_every_worker(
    tmp_path: Path, warm_cache: Path, fake_upstream: FakeOpenAI
) -> None:
    with serve(tmp_path, warm_cache, fake_upstream.url) as server:
        pids = [int(pid) for pid in server.wait_for(r"serving \(pids (\d+), (\d+)\)").groups()]
        seen: set[str] = set()
        ids = drive(server.url, seen, wanted=2, at_least=8)
        live = {labels: v for labels, v in scrape(server.url, "guardrail_classifier_info").items()}
        assert {dict(labels)["pid"] for labels in live} == {str(pid) for pid in pids}

        os.kill(pids[1], signal.SIGKILL)
        server.wait_for(rf"worker 1 \[pid {pids[1]}\] exited \(killed by SIGKILL\): restarting it")
        new_pid = int(server.wait_for(r"worker 1 \[pid (\d+)\] serving again").group(1))
        ids += drive(server.url, seen, wanted=3, start=len(ids), at_least=1)  # the new worker serves

        # The dead worker's counts stay in the total; its live gauge went with it.
        assert requests_counted(server.url, len(ids)) == len(ids)
        live = {labels: v for labels, v in scrape(server.url, "guardrail_classifier_info").items()}
        assert {dict(labels)["pid"] for labels in live} == {str(pids[0]), str(new_pid)}

        server.process.send_signal(signal.SIGHUP)
        for index in (0, 1):  # each worker's own handler: here, nothing to reload
            server.wait_for(rf"guardrail.admin \[w{index}\]: SIGHUP: nothing to reload", timeout=10)
        assert server.process.poll() is None
        assert server.stop() == 0

    # The restarted worker went on in its slot's file: no third file.
    assert sorted(p.name for p in tmp_path.glob("interactions*")) == [
        "interactions.w0.jsonl",
        "interactions.w1.jsonl",
    ]
    assert len({prefix(id) for id in ids_in(worker_log_path(server.log, 1))}) == 2


def test_a_worker_that_cannot_start_stops_the_server(
    tmp_path: Path, warm_cache: Path, fake_upstream: FakeOpenAI
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with serve(tmp_path, warm_cache, fake_upstream.url, "--classifier", str(broken)) as server:
        assert server.process.wait(STARTUP) == 2
    output = server.output()
    assert "guardrail: error: worker " in output
    assert "could not start (exit code 3): stopping" in output
    assert "Traceback" not in output
    assert list(server.tmp.glob("guardrail-metrics-*")) == []


# --- the parts ---------------------------------------------------------------------------------------


def test_each_worker_logs_to_its_own_file() -> None:
    settings = Settings(log_path=Path("logs/interactions.jsonl"), workers=3)
    assert for_worker(settings, 2).log_path == Path("logs/interactions.w2.jsonl")
    assert for_worker(settings, 2).workers == 3
    assert for_worker(Settings(log_path=None), 0).log_path is None


def test_encoder_threads_share_out_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().encoders == 2  # one process: as before workers existed
    monkeypatch.setattr(settings_module, "cores", lambda: 8)
    assert Settings(workers=2).encoders == 4
    assert Settings(workers=16).encoders == 1  # never none
    assert Settings(workers=2, encoder_workers=3).encoders == 3  # a chosen value stands


def test_metrics_directory_is_private_and_removed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(MULTIPROCESS_ENV, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    with metrics_directory() as directory:
        assert os.environ[MULTIPROCESS_ENV] == str(directory)
        assert directory.parent == tmp_path
        assert directory.stat().st_mode & 0o777 == 0o700
        (directory / "counter_1.db").write_bytes(b"")
    assert not directory.exists()
    assert MULTIPROCESS_ENV not in os.environ


def test_metrics_directory_of_the_user_is_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path))
    with metrics_directory() as directory:
        assert directory == tmp_path
    assert tmp_path.is_dir() and os.environ[MULTIPROCESS_ENV] == str(tmp_path)
    assert caplog.records == []
    (tmp_path / "counter_123.db").write_bytes(b"")
    with metrics_directory():
        pass
    assert "empty it between runs" in caplog.text
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="is not a directory"), metrics_directory():
        pass


@pytest.mark.parametrize("feedback_first", [False, True])
def test_retraining_joins_feedback_from_another_workers_file(tmp_path: Path, feedback_first: bool) -> None:
    path = tmp_path / "interactions.jsonl"
    id = "gr-0123456789ab000000000007"
    request = {
        "id": id,
        "text": "Is the flat on Station Road still available?",
        "verdict": "blocked",
        "layer": "similarity",
        "score": 0.01,
        "threshold": 0.06,
    }
    feedback = {"type": "feedback", "id": id, "on_topic": True, "source": "human"}
    w0, w1 = worker_log_path(path, 0), worker_log_path(path, 1)
    w0.write_bytes(orjson.dumps(request) + b"\n")
    w1.write_bytes(orjson.dumps(feedback) + b"\n")
    times = (200, 100) if feedback_first else (100, 200)
    for file, at in zip((w0, w1), times, strict=True):
        os.utime(file, (at, at))

    data = read_labels([path])
    assert [(label.text, label.on_topic, label.source) for label in data.labels] == [
        (request["text"], True, "human")
    ]
    assert "feedback_unknown_id" not in data.skipped
