from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import orjson
import pytest

from guardrail.errors import ConfigError, DataError
from guardrail.interactions import InteractionLog, log_files, new_id, read_interactions, worker_log_path


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until the writer thread has caught up; fail rather than hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the writer thread"
        time.sleep(0.001)


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def all_records(path: Path) -> list[dict[str, Any]]:
    return list(read_interactions(log_files(path)))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ControlledFile:
    """A real file whose writes can be made to fail or to wait, as a full or slow disk would."""

    def __init__(self, file: BinaryIO, log: ControlledLog) -> None:
        self._file = file
        self._log = log

    def write(self, data: bytes) -> int:
        self._log.entered.set()
        assert self._log.gate.wait(5.0), "the test never opened the gate"
        if self._log.failure is not None:
            raise self._log.failure
        return self._file.write(data)

    def flush(self) -> None:
        self._log.flushes += 1
        self._file.flush()

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


class ControlledLog(InteractionLog):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.failure: OSError | None = None
        self.open_failure: OSError | None = None
        self.flushes = 0

    def _open(self, mode: Literal["ab", "wb"]) -> BinaryIO:
        if self.open_failure is not None:
            raise self.open_failure
        return ControlledFile(super()._open(mode), self)  # type: ignore[return-value]


def test_new_id_is_prefixed_hex_and_unique() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"gr-[0-9a-f]{24}", i) for i in ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_bytes": 0}, "max_bytes"), ({"backups": -1}, "backups"), ({"queue_size": 0}, "queue_size")],
)
def test_invalid_arguments_raise_config_error(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        InteractionLog(tmp_path / "log.jsonl", **kwargs)


def test_construction_and_an_idle_close_do_no_io(tmp_path: Path) -> None:
    log = InteractionLog(tmp_path / "a" / "b" / "log.jsonl")
    log.close()
    assert not (tmp_path / "a").exists()
    assert log.path == tmp_path / "a" / "b" / "log.jsonl"


def test_round_trip_with_unicode_and_numpy(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "log.jsonl"
    records = [
        {
            "id": new_id(),
            "text": "Can I view the flat? 日本語 🏠 é",
            "score": np.float32(0.25),
            "n": np.int64(3),
        },
        {"id": new_id(), "allowed": False, "extra": None, "tags": ["a", "b"], "meta": {"k": 1.5}},
    ]
    with InteractionLog(path) as log:
        assert all(log.write(r) for r in records)
    assert log.written == 2
    assert log.dropped == 0
    got = lines_of(path)
    assert got[0]["text"] == "Can I view the flat? 日本語 🏠 é"
    assert got[0]["score"] == 0.25
    assert got[0]["n"] == 3
    assert got[1] == records[1]
    assert path.read_bytes().endswith(b"}\n")


def test_unserialisable_record_raises_at_the_caller(tmp_path: Path) -> None:
    log = InteractionLog(tmp_path / "log.jsonl")
    with pytest.raises(TypeError):
        log.write({"bad": object()})
    assert log.depth == 0


def test_ten_thousand_records_all_present_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with InteractionLog(path) as log:
        for i in range(10_000):
            assert log.write({"i": i})
    assert log.written == 10_000
    assert log.dropped == 0
    assert log.depth == 0
    assert [r["i"] for r in lines_of(path)] == list(range(10_000))


def test_a_burst_is_written_in_few_batches_not_one_flush_per_record(tmp_path: Path) -> None:
    log = ControlledLog(tmp_path / "log.jsonl", queue_size=2000)
    log.gate.clear()
    log.start()
    log.write({"i": 0})
    assert log.entered.wait(5.0)  # the writer is now stuck inside the first batch
    for i in range(1, 1000):
        assert log.write({"i": i})
    assert log.depth == 999
    log.gate.set()
    log.close()
    assert log.written == 1000
    assert log.flushes == 2  # the first record alone, then the other 999 together


def test_rotation_keeps_every_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with InteractionLog(path, max_bytes=1000, backups=20) as log:
        for i in range(200):
            log.write({"i": i, "pad": "x" * 20})
    files = log_files(path)
    assert len(files) > 5
    assert files == [path.with_name(f"log.jsonl.{n}") for n in range(len(files) - 1, 0, -1)] + [path]
    assert not path.with_name(f"log.jsonl.{len(files)}").exists()
    for file in files:
        assert 0 < file.stat().st_size <= 1000
    assert sum(len(file.read_bytes().splitlines()) for file in files) == log.written == 200
    assert [r["i"] for r in all_records(path)] == list(range(200))


def test_rotation_drops_files_beyond_backups(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with InteractionLog(path, max_bytes=200, backups=2) as log:
        for i in range(200):
            log.write({"i": i})
    assert log_files(path) == [path.with_name("log.jsonl.2"), path.with_name("log.jsonl.1"), path]
    kept = [r["i"] for r in all_records(path)]
    assert kept == list(range(200 - len(kept), 200))  # the newest records, contiguous
    assert len(kept) < 200


def test_backups_zero_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with InteractionLog(path, max_bytes=100, backups=0) as log:
        for i in range(100):
            log.write({"i": i})
    assert log_files(path) == [path]
    assert path.stat().st_size <= 100
    kept = [r["i"] for r in lines_of(path)]
    assert kept[-1] == 99
    assert kept == list(range(100 - len(kept), 100))
    assert len(kept) < 100


def test_a_line_longer_than_max_bytes_is_written_alone(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with InteractionLog(path, max_bytes=100, backups=5) as log:
        log.write({"i": 0})
        log.write({"i": 1, "big": "y" * 500})
        log.write({"i": 2})
    assert [[r["i"] for r in lines_of(f)] for f in log_files(path)] == [[0], [1], [2]]
    assert path.with_name("log.jsonl.1").stat().st_size > 500


def test_an_oversize_first_line_goes_into_the_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with InteractionLog(path, max_bytes=10) as log:
        log.write({"big": "z" * 50})
    assert log_files(path) == [path]
    assert lines_of(path) == [{"big": "z" * 50}]


def test_restart_appends_and_takes_the_size_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with InteractionLog(path) as first:
        for i in range(3):
            first.write({"i": i})
    with InteractionLog(path) as second:
        second.write({"i": 3})
    assert [r["i"] for r in lines_of(path)] == [0, 1, 2, 3]
    # A third run whose limit the existing file already nearly fills rotates before its first line.
    with InteractionLog(path, max_bytes=path.stat().st_size + 1) as third:
        third.write({"i": 4})
    assert [r["i"] for r in lines_of(path.with_name("log.jsonl.1"))] == [0, 1, 2, 3]
    assert [r["i"] for r in lines_of(path)] == [4]


def test_a_full_queue_drops_and_close_flushes_records_queued_before_start(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = InteractionLog(path, queue_size=3)
    assert [log.write({"i": i}) for i in range(5)] == [True, True, True, False, False]
    assert log.dropped == 2
    assert log.depth == 3
    log.close()
    assert [r["i"] for r in lines_of(path)] == [0, 1, 2]
    assert (log.written, log.dropped, log.depth) == (3, 2, 0)


def test_write_never_waits_for_a_busy_writer(tmp_path: Path) -> None:
    log = ControlledLog(tmp_path / "log.jsonl", queue_size=2)
    log.gate.clear()
    log.start()
    assert log.write({"i": 0})
    assert log.entered.wait(5.0)  # record 0 is taken, and the writer is blocked writing it
    assert log.write({"i": 1})
    assert log.write({"i": 2})
    started = time.monotonic()
    assert not log.write({"i": 3})
    assert time.monotonic() - started < 0.5
    assert log.dropped == 1
    log.gate.set()
    log.close()
    assert [r["i"] for r in lines_of(log.path)] == [0, 1, 2]


def test_drop_warnings_are_rate_limited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = InteractionLog(tmp_path / "log.jsonl", queue_size=1, clock=clock)
    caplog.set_level(logging.WARNING, logger="guardrail.interactions")
    log.write({"i": 0})
    for _ in range(3):
        assert not log.write({"i": 1})
    clock.now += 9.9
    assert not log.write({"i": 2})
    assert len(caplog.records) == 1
    clock.now += 0.2
    assert not log.write({"i": 3})
    assert len(caplog.records) == 2
    assert "dropped 4 record(s) since the last warning, 5 in all" in caplog.records[1].getMessage()
    assert log.dropped == 5


def test_write_after_close_is_dropped_and_close_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = InteractionLog(path)
    log.start()
    log.start()
    assert log.write({"i": 0})
    log.close()
    log.close(timeout=0.0)
    assert not log.write({"i": 1})
    log.start()  # a no-op once closed
    assert not log.write({"i": 2})
    assert (log.written, log.dropped) == (1, 2)
    assert lines_of(path) == [{"i": 0}]


def test_a_write_error_is_logged_once_counted_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="guardrail.interactions")
    log = ControlledLog(tmp_path / "log.jsonl")
    log.start()
    assert log.write({"i": 0})
    wait_for(lambda: log.written == 1)
    log.failure = OSError(errno.ENOSPC, "No space left on device")
    log.write({"i": 1})
    wait_for(lambda: log.dropped == 1)
    log.write({"i": 2})
    log.write({"i": 3})
    wait_for(lambda: log.dropped == 3)
    assert len(caplog.records) == 1
    assert "No space left on device" in caplog.records[0].getMessage()
    log.failure = OSError(errno.EIO, "Input/output error")
    log.write({"i": 4})
    wait_for(lambda: log.dropped == 4)
    assert len(caplog.records) == 2  # a new kind of error is reported too
    log.failure = None
    assert log.write({"i": 5})
    log.close()
    assert (log.written, log.dropped) == (2, 4)
    assert [r["i"] for r in lines_of(log.path)] == [0, 5]


def test_an_open_error_is_survived_and_the_file_reopened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="guardrail.interactions")
    log = ControlledLog(tmp_path / "log.jsonl")
    log.open_failure = PermissionError(errno.EACCES, "Permission denied")
    log.start()
    log.write({"i": 0})
    wait_for(lambda: log.dropped == 1)
    log.write({"i": 1})
    wait_for(lambda: log.dropped == 2)
    assert len(caplog.records) == 1
    log.open_failure = None
    log.write({"i": 2})
    log.close()
    assert (log.written, log.dropped) == (1, 2)
    assert lines_of(log.path) == [{"i": 2}]


def test_eight_threads_writing_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"

    def writer(log: InteractionLog, t: int) -> None:
        for i in range(1000):
            assert log.write({"t": t, "i": i})

    with InteractionLog(path) as log:
        threads = [threading.Thread(target=writer, args=(log, t)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    records = lines_of(path)
    assert len(records) == log.written == 8000
    for t in range(8):
        assert [r["i"] for r in records if r["t"] == t] == list(range(1000))


def test_read_interactions_skips_blank_lines_across_files(tmp_path: Path) -> None:
    old, new = tmp_path / "log.jsonl.1", tmp_path / "log.jsonl"
    old.write_bytes(b'{"i": 0}\n\n  \n{"i": 1}\n')
    new.write_bytes(b'{"i": 2}\n{"i": 3}')  # a complete last line without its newline still counts
    assert log_files(tmp_path / "log.jsonl") == [old, new]
    assert [r["i"] for r in read_interactions([old, new])] == [0, 1, 2, 3]


def test_read_interactions_rejects_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": \n{"i": 2}\n')
    with pytest.raises(DataError, match="invalid JSON") as info:
        list(read_interactions([path]))
    assert (info.value.path, info.value.line) == (str(path), 2)
    assert str(info.value).startswith(f"{path}:2: ")


def test_read_interactions_rejects_a_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"i": 0}\n[1, 2]\n')
    with pytest.raises(DataError, match="JSON object") as info:
        list(read_interactions([path]))
    assert info.value.line == 2


def test_read_interactions_skips_a_truncated_last_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": 1}\n{"i": 2, "te')
    caplog.set_level(logging.WARNING, logger="guardrail.interactions")
    assert list(read_interactions([path])) == [{"i": 0}, {"i": 1}]
    assert len(caplog.records) == 1
    assert f"{path}:3" in caplog.records[0].getMessage()


def test_read_interactions_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read") as info:
        list(read_interactions([tmp_path / "missing.jsonl"]))
    assert info.value.path == str(tmp_path / "missing.jsonl")


def test_new_id_differs_in_a_forked_worker() -> None:
    # Workers forked from one parent must not hand out the same ids.
    first = new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report an id and leave at once
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert re.fullmatch(r"gr-[0-9a-f]{24}", child)
    assert child[:15] != first[:15]  # another prefix, not just the next number


# --- several workers: one file each, read back together ----------------------------------------------


def write_lines(path: Path, records: list[dict[str, Any]], modified: int) -> Path:
    """A log file holding ``records``, last written at ``modified`` (seconds since the epoch)."""
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    os.utime(path, ns=(modified * 10**9, modified * 10**9))
    return path


def test_worker_log_path_is_beside_the_configured_one(tmp_path: Path) -> None:
    assert worker_log_path(tmp_path / "interactions.jsonl", 0) == tmp_path / "interactions.w0.jsonl"
    assert worker_log_path("logs/interactions.jsonl", 12) == Path("logs/interactions.w12.jsonl")
    assert worker_log_path("interactions", 1) == Path("interactions.w1")


def test_log_files_gathers_every_workers_files_and_rotations_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "interactions.jsonl"
    w0, w1 = worker_log_path(path, 0), worker_log_path(path, 1)
    # A single-process log from before, then two workers whose rotations interleave in time.
    files = [
        write_lines(path.with_name("interactions.jsonl.1"), [{"i": 0}], 100),
        write_lines(path, [{"i": 1}], 200),
        write_lines(w1.with_name("interactions.w1.jsonl.2"), [{"i": 2}], 300),
        write_lines(w0.with_name("interactions.w0.jsonl.1"), [{"i": 3}], 400),
        write_lines(w1.with_name("interactions.w1.jsonl.1"), [{"i": 4}], 500),
        write_lines(w0, [{"i": 5}], 600),
        write_lines(w1, [{"i": 6}], 700),
    ]
    # Neither other logs in the directory nor names no worker writes are taken.
    for other in (
        "interactions.w01.jsonl",
        "interactions.wx.jsonl",
        "other.w0.jsonl",
        "interactions.w0.json",
    ):
        write_lines(tmp_path / other, [{"i": -1}], 650)

    assert log_files(path) == files
    assert [r["i"] for r in all_records(path)] == list(range(7))
    # One worker's own file lists that worker's files only.
    assert log_files(w1) == [files[2], files[4], files[6]]


def test_log_files_keeps_each_workers_order_whatever_the_timestamps(tmp_path: Path) -> None:
    # Copied without their timestamps: a worker's newer file may look older than its backup.
    path = tmp_path / "log.jsonl"
    w0, w1 = worker_log_path(path, 0), worker_log_path(path, 1)
    w0_old = write_lines(w0.with_name("log.w0.jsonl.1"), [{"i": "w0 old"}], 500)
    w0_new = write_lines(w0, [{"i": "w0 new"}], 100)
    w1_only = write_lines(w1, [{"i": "w1"}], 300)
    files = log_files(path)
    assert files.index(w0_old) < files.index(w0_new)
    assert sorted(files) == sorted([w0_old, w0_new, w1_only])  # each once


def test_log_files_sorts_worker_indexes_as_numbers(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    written = [write_lines(worker_log_path(path, i), [{"i": i}], 100) for i in (10, 2, 0)]
    assert log_files(path) == written[::-1]  # equal times: by worker index, 0, 2, 10


def test_worker_logs_rotate_apart_and_read_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "interactions.jsonl"
    logs = [InteractionLog(worker_log_path(path, i), max_bytes=300, backups=50) for i in range(2)]
    for log in logs:
        log.start()
    for i in range(100):
        logs[i % 2].write({"i": i, "pad": "x" * 20})
    for log in logs:
        log.close()
    files = log_files(path)
    assert len(files) > 4
    assert not path.exists()
    records = [r["i"] for r in read_interactions(files)]
    assert sorted(records) == list(range(100))  # every record once
    # Each worker's records in the order it wrote them.
    assert [i for i in records if i % 2 == 0] == list(range(0, 100, 2))
    assert [i for i in records if i % 2 == 1] == list(range(1, 100, 2))
