"""The interaction log: one JSON line per guarded request, written off the request path.

``write`` is called on the event loop, so it does no I/O: it serialises the record with orjson (a few
microseconds, and a snapshot of the dict as it is now) and ``put_nowait``s the line onto a bounded queue.
One daemon thread drains the queue in batches, taking everything available, writing it and flushing once,
so a burst of a thousand records costs one flush, not a thousand. After each batch it rests for
``FLUSH_INTERVAL`` (50 ms) while the next one gathers: woken for every record, it cost the proxy a
thread hand-off and a write per request; so a record reaches the file within about 50 ms.

The bound is deliberate: when the disk is slower than the traffic, memory stays capped at
``queue_size`` lines and ``write`` drops the record, counts it in ``dropped`` and returns False, with a
warning at most every ten seconds. A lost log line is better than a stalled request or unbounded memory.

The file is rotated by size like ``logging.handlers.RotatingFileHandler``: before a line that would take
it past ``max_bytes``, ``path`` becomes ``path.1``, ``path.1`` becomes ``path.2`` and so on up to
``backups``; with ``backups=0`` the file starts afresh. A line longer than ``max_bytes`` is still written,
alone in a fresh file. The file is opened for appending, so a restart continues it. An I/O error in the
writer (disk full, permissions) is logged once per kind, the lines it lost are counted in ``dropped``,
and the next batch reopens the file. Rotation assumes one writer per file: give each process its own path.
``guardrail serve --workers N`` does: worker ``i`` writes ``worker_log_path(path, i)``
(``interactions.jsonl`` becomes ``interactions.w0.jsonl``, ``interactions.w1.jsonl``, ...), the same name
after a restart, so the files do not multiply.

``read_interactions`` reads the files back for retraining; ``log_files`` lists them, the workers' files
and every rotation included, oldest first.
"""

from __future__ import annotations

import contextlib
import glob
import heapq
import itertools
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

import orjson

from guardrail.errors import ConfigError, DataError

logger = logging.getLogger("guardrail.interactions")

WARNING_INTERVAL = 10.0
FLUSH_INTERVAL = 0.05  # seconds the writer rests after each batch
_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY
_STOP = b""  # never a real line: every serialised line ends with a newline


class _Ids:
    """Record ids: a random 48-bit prefix for this process and a 48-bit counter after it.

    Unique without a system call per request (``secrets.token_hex`` cost the event loop about 10 us of
    ``getrandom`` per request); a forked worker draws its own prefix. Ids need not be secret: the
    feedback endpoint that takes them wants the admin token.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = "gr-" + secrets.token_hex(6)
        self.counter = itertools.count()


_ids = _Ids()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.reseed)


def new_id() -> str:
    """A fresh record id: "gr-" and 24 hex digits, unique across requests, restarts and workers."""
    return f"{_ids.prefix}{next(_ids.counter) & 0xFFFFFFFFFFFF:012x}"


class InteractionLog:
    """A size-rotated JSONL file, fed through a bounded queue by one writer thread."""

    def __init__(
        self,
        path: Path | str,
        max_bytes: int = 100 * 2**20,
        backups: int = 5,
        queue_size: int = 10_000,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 1:
            raise ConfigError(f"interaction log max_bytes must be at least 1, got {max_bytes}")
        if backups < 0:
            raise ConfigError(f"interaction log backups must be 0 or more, got {backups}")
        if queue_size < 1:
            raise ConfigError(f"interaction log queue_size must be at least 1, got {queue_size}")
        self._path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._clock = clock  # for rate-limiting the queue-full warning
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        # Guards the counters and the closed flag; never held across I/O.
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._written = 0
        self._dropped = 0
        self._unreported = 0
        self._last_warning: float | None = None
        # Touched only by the writer thread.
        self._file: BinaryIO | None = None
        self._size = 0
        self._errors_seen: set[tuple[type[OSError], int | None]] = set()

    @property
    def path(self) -> Path:
        """The current log file; backups are ``path.1`` to ``path.<backups>``."""
        return self._path

    @property
    def depth(self) -> int:
        """How many records are queued now."""
        return self._queue.qsize()

    @property
    def written(self) -> int:
        """How many records have been written and flushed."""
        return self._written

    @property
    def closed(self) -> bool:
        """True once ``close`` was called: writes are refused from then on."""
        return self._closed

    @property
    def dropped(self) -> int:
        """How many records were lost: queue full, log closed, or an I/O error."""
        return self._dropped

    def start(self) -> None:
        """Start the writer thread; idempotent, a no-op once closed, and does no file I/O itself."""
        with self._lock:
            if self._thread is None and not self._closed:
                self._start_thread()

    def write(self, record: dict[str, Any]) -> bool:
        """Queue one record without blocking; False if it was dropped. Unserialisable records raise."""
        line = orjson.dumps(record, option=_OPTIONS)
        with self._lock:
            if not self._closed:
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(line)
                    return True
            self._dropped += 1
            self._unreported += 1
            now = self._clock()
            if self._last_warning is not None and now - self._last_warning < WARNING_INTERVAL:
                return False
            self._last_warning = now
            count, self._unreported = self._unreported, 0
            total, state = self._dropped, "closed" if self._closed else "full"
        logger.warning(
            "interaction log %s is %s: dropped %d record(s) since the last warning, %d in all",
            self._path, state, count, total,
        )  # fmt: skip
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer and close the file; idempotent.

        This blocks for up to ``timeout`` seconds, so on an event loop use
        ``await asyncio.to_thread(log.close)``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is None and self._queue.empty():
                return
            # Records written before start() are flushed too.
            thread = self._thread if self._thread is not None else self._start_thread()
        deadline = time.monotonic() + timeout
        # Nothing can be queued after the stop marker: writes are refused once closed.
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
            thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            logger.warning(
                "interaction log %s: the writer did not finish within %.1f s; %d record(s) still queued",
                self._path, timeout, self.depth,
            )  # fmt: skip

    def __enter__(self) -> InteractionLog:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._run, name="guardrail-interactions", daemon=True)
        self._thread.start()
        return self._thread

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                # Bounded, so a producer that keeps up cannot keep the batch open for ever.
                while len(batch) < self._queue.maxsize:
                    batch.append(self._queue.get_nowait())
            lines = [line for line in batch if line]
            stopping = len(lines) < len(batch)
            if lines:
                self._write_batch(lines)
            if not stopping:
                time.sleep(FLUSH_INTERVAL)
        self._discard_file()

    def _write_batch(self, lines: list[bytes]) -> None:
        done = 0  # lines already on disk, flushed by closing the file at a rotation
        try:
            file = self._file if self._file is not None else self._open_file("ab")
            start = 0
            for i, line in enumerate(lines):
                if self._size > 0 and self._size + len(line) > self.max_bytes:
                    file.write(b"".join(lines[start:i]))
                    file = self._rotate(file)
                    done = start = i
                self._size += len(line)
            file.write(b"".join(lines[start:]))
            file.flush()
            done = len(lines)
        except OSError as exc:
            self._discard_file()
            self._report(exc)
        with self._lock:
            self._written += done
            self._dropped += len(lines) - done

    def _rotate(self, file: BinaryIO) -> BinaryIO:
        self._file = None
        file.close()
        if self.backups == 0:
            return self._open_file("wb")
        for n in range(self.backups - 1, 0, -1):
            if self._backup(n).exists():
                os.replace(self._backup(n), self._backup(n + 1))
        if self._path.exists():  # it may have been moved away by hand
            os.replace(self._path, self._backup(1))
        return self._open_file("ab")

    def _backup(self, n: int) -> Path:
        return self._path.with_name(f"{self._path.name}.{n}")

    def _open_file(self, mode: Literal["ab", "wb"]) -> BinaryIO:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        file = self._open(mode)
        self._size = file.tell()  # append mode starts at the end of the file
        self._file = file
        return file

    def _open(self, mode: Literal["ab", "wb"]) -> BinaryIO:
        """Open the log file; the one place the filesystem is entered, so tests can inject failures."""
        return open(self._path, mode)

    def _discard_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()

    def _report(self, exc: OSError) -> None:
        kind = (type(exc), exc.errno)
        if kind not in self._errors_seen:
            self._errors_seen.add(kind)
            logger.error(
                "interaction log %s: cannot write (%s); dropping records until it clears", self._path, exc
            )


def worker_log_path(path: Path | str, index: int) -> Path:
    """Worker ``index``'s own log beside ``path``: ``interactions.jsonl`` -> ``interactions.w0.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.w{index}{path.suffix}")


def log_files(path: Path | str) -> list[Path]:
    """The log files of ``path`` that exist, oldest first, each once: ``path`` with its backups
    (``path.N``, ..., ``path.1``, ``path``), and the files of every worker that wrote beside it
    (``worker_log_path``) with theirs.

    One writer's files keep their own order. The writers' files are interleaved by when each was last
    written (its modification time): one writer's rotations do not line up with another's, and this
    puts a file that ended earlier before one that ended later.
    """
    path = Path(path)
    # Indexes as worker_log_path writes them ("w01" is no worker's), each with its backups.
    name = rf"{re.escape(path.stem)}\.w(0|[1-9][0-9]*){re.escape(path.suffix)}(?:\.[0-9]+)?"
    pattern = re.compile(name)
    workers: set[int] = set()
    for candidate in path.parent.glob(f"{glob.escape(path.stem)}.w*"):
        match = pattern.fullmatch(candidate.name)
        if match:
            workers.add(int(match.group(1)))
    writers = [_rotations(path)] + [_rotations(worker_log_path(path, i)) for i in sorted(workers)]
    if len(writers) == 1:
        return writers[0]
    # heapq.merge takes each list's files in their order and breaks ties by list: a file whose time
    # is off (copied without its timestamps) cannot put one writer's files out of order.
    return list(heapq.merge(*writers, key=_modified))


def logs_named(paths: Iterable[Path | str]) -> list[Path]:
    """The files of every log in ``paths`` (see ``log_files``), each once: a backup or a worker's log
    named beside the log it belongs to is read once. A name with no file at all is a ``DataError``."""
    files: list[Path] = []
    for given in paths:
        found = log_files(given)
        if not found:
            raise DataError("no such file", str(given))
        files += found
    return list(dict.fromkeys(files))


def _rotations(path: Path) -> list[Path]:
    """One writer's file and its backups that exist, oldest first: ``path.N``, ..., ``path.1``, ``path``."""
    backups: list[tuple[int, Path]] = []
    for candidate in path.parent.glob(glob.escape(path.name) + ".*"):
        suffix = candidate.name[len(path.name) + 1 :]
        if suffix.isascii() and suffix.isdigit():
            backups.append((int(suffix), candidate))
    return [p for _, p in sorted(backups, reverse=True)] + ([path] if path.exists() else [])


def _modified(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # rotated away since it was listed: it sorts first, and reading it will say so
        return 0


def read_interactions(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Yield the records of JSONL logs in order; blank lines and a torn last line are skipped."""
    for _, _, record in read_records(paths):
        yield record


def read_records(paths: Iterable[Path]) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """``read_interactions`` with each record's file and line number, for messages about it."""
    for path in paths:
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise DataError(f"cannot read the interaction log: {exc.strerror}", str(path)) from exc
        with file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    if not line.endswith(b"\n"):  # only the last line can lack one: a write cut short
                        logger.warning("%s:%d: skipping a truncated last line", path, number)
                        continue
                    raise DataError(f"invalid JSON: {exc}", str(path), number) from exc
                if not isinstance(record, dict):
                    raise DataError(f"expected a JSON object, got {type(record).__name__}", str(path), number)
                yield path, number, record
