"""Several server processes on one socket: ``guardrail serve --workers N``.

The parent binds the socket, starts N workers and watches over them; it loads no model and serves no
request. Each worker is a fresh interpreter (multiprocessing's spawn) that loads its own guard, builds the
proxy app and runs ``uvicorn.Server(config).run(sockets=[sock])`` on the shared socket, where the kernel
gives each new connection to one of them. Their metrics meet in prometheus-client's multiprocess
directory (see ``guardrail/metrics.py``), so one scrape of any worker counts every worker's requests.

Why a supervisor of our own rather than uvicorn's (``uvicorn.run("m:factory", factory=True, workers=N)``,
``uvicorn.supervisors.Multiprocess``), which shares a socket the same way:

- Stable worker indexes. uvicorn does not tell a worker which slot it fills. Worker ``i`` is told here,
  and is ``i`` again when it is restarted, so it writes ``interactions.w<i>.jsonl`` (rotation wants one
  writer per file) and the files do not multiply over restarts.
- SIGHUP reaches every worker. uvicorn's parent answers it by replacing each worker in turn (a model
  load each) and the workers never see it; here it is passed on, and each worker reloads its classifier
  in place as a single server does (``guardrail/admin.py``).
- Dead workers' live gauges. uvicorn's parent has no hook for a worker that exited; here
  ``mark_process_dead(pid)`` is called for each one, restarts included.
- The settings reach the workers as the one frozen ``Settings`` object (pickled by spawn), not through
  environment variables or an import-time factory.

Kept from uvicorn: spawn, not fork (a fresh interpreter imports prometheus-client after
``PROMETHEUS_MULTIPROC_DIR`` is set, and no onnxruntime or encoder thread is forked); SIGTERM to stop a
worker, which is uvicorn's graceful shutdown (in-flight requests finish, then the app's lifespan flushes
the interaction log); and a worker that fails before it serves (exit code 3, or any error) stops the
parent rather than being restarted for ever. A worker that dies after it started serving (killed, out of
memory) is restarted in its slot, at most once a second per slot. SIGINT and SIGTERM stop the parent,
which stops the workers, waits for them and exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from guardrail.errors import ConfigError, GuardrailError
from guardrail.interactions import worker_log_path
from guardrail.settings import Settings

logger = logging.getLogger("guardrail.workers")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # as guardrail/metrics.py reads it
STARTUP_FAILURE = 3  # uvicorn's exit code for a server that could not start
RESTART_DELAY = 1.0  # seconds between starts of one slot, so a crashing worker cannot spin
STOP_MARGIN = 5.0  # seconds past the graceful shutdown before a worker that has not stopped is killed
BACKLOG = 2048  # uvicorn's default
_HANGUP = getattr(signal, "SIGHUP", None)


@dataclass(frozen=True)
class ServeOptions:
    """How each worker's uvicorn server runs."""

    log_level: str = "info"
    access_log: bool = False
    graceful: int = 10  # seconds in-flight requests get to finish at a stop


def for_worker(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: its own interaction log file, beside the configured one."""
    if settings.log_path is None:
        return settings
    return replace(settings, log_path=worker_log_path(settings.log_path, index))


def serve_workers(settings: Settings, options: ServeOptions) -> int:
    """Serve with ``settings.workers`` processes until SIGINT or SIGTERM; the exit code."""
    from guardrail.scenario import load_scenario

    # One clear error now rather than one per worker after each has loaded a model.
    assert settings.scenario is not None and settings.upstream is not None
    document = load_scenario(settings.scenario)
    sock = bind(settings.host, settings.port)
    with contextlib.closing(sock), metrics_directory() as directory:
        base = f"http://{settings.host}:{settings.port}"
        logs = "off"
        if settings.log_path is not None:
            first, last = (worker_log_path(settings.log_path, i) for i in (0, settings.workers - 1))
            logs = f"{first} ... {last.name}"
        print(
            f"guardrail: guarding {settings.upstream} with {settings.scenario} ({document.title}; "
            f"mode {settings.mode}) in {settings.workers} workers, {settings.encoders} encoder "
            f"thread(s) each\n"
            f"guardrail: clients use base URL {base}/v1; metrics at {base}/metrics "
            f"(multiprocess, {directory}); log {logs}",
            file=sys.stderr,
            flush=True,
        )
        return Supervisor(settings, options, sock).run()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listening now: a client that comes before the workers are up waits for them, not refused.
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


@contextlib.contextmanager
def metrics_directory() -> Iterator[Path]:
    """``PROMETHEUS_MULTIPROC_DIR`` for the workers: the one set in the environment, else a fresh private
    directory, set in the environment before any worker starts and removed at exit."""
    given = os.environ.get(MULTIPROCESS_ENV, "").strip()
    if given:
        path = Path(given)
        if not path.is_dir():
            raise ConfigError(f"{MULTIPROCESS_ENV}={given} is not a directory: create it, or unset it")
        if any(path.glob("*.db")):
            # prometheus-client adds up every file it finds there: a past run's counts included.
            logger.warning(
                "%s=%s holds metric files from an earlier run, which add to this run's counts: empty it "
                "between runs",
                MULTIPROCESS_ENV, given,
            )  # fmt: skip
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="guardrail-metrics-"))  # mode 0700
    os.environ[MULTIPROCESS_ENV] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROCESS_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class _Slot:
    """One worker's place: its index stays, its process changes with each restart."""

    index: int
    process: BaseProcess | None = None
    ready: Connection | None = None  # where the worker says it serves; None once it has
    serving: bool = False
    started: float = 0.0  # time.monotonic() of the last start
    restart_at: float | None = None


class Supervisor:
    """Starts ``settings.workers`` processes on ``sock``, restarts the ones that die, passes SIGHUP on,
    and stops them all at SIGINT or SIGTERM."""

    def __init__(self, settings: Settings, options: ServeOptions, sock: socket.socket) -> None:
        self.settings = settings
        self.options = options
        self.sock = sock
        self.slots = [_Slot(i) for i in range(settings.workers)]
        self._context = multiprocessing.get_context("spawn")
        self._signals: list[int] = []
        # A signal handler writes a byte here, so the wait for workers wakes up for it.
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._began = time.monotonic()
        self._announced = False  # that every worker serves, once

    def run(self) -> int:
        """Supervise until told to stop; 0 after a clean stop, 2 when a worker could not start."""
        handled = [signal.SIGINT, signal.SIGTERM] + ([_HANGUP] if _HANGUP is not None else [])
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            for slot in self.slots:
                self._start(slot)
            return self._supervise()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._wake_read.close()
            self._wake_write.close()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)
        with contextlib.suppress(OSError):  # full: a wake-up is already pending
            self._wake_write.send(b"\0")

    def _supervise(self) -> int:
        while True:
            while self._signals:
                sig = self._signals.pop(0)
                if sig != _HANGUP:
                    logger.info("%s: stopping the workers", signal.Signals(sig).name)
                    return 0
                self._hang_up()
            now = time.monotonic()
            for slot in self.slots:
                if slot.restart_at is not None and slot.restart_at <= now:
                    self._start(slot)
            waiting: list[Any] = [self._wake_read]
            for slot in self.slots:
                if slot.process is not None:
                    waiting.append(slot.process.sentinel)
                if slot.ready is not None:
                    waiting.append(slot.ready)
            pending = [slot.restart_at - now for slot in self.slots if slot.restart_at is not None]
            woken = multiprocessing.connection.wait(waiting, min(pending, default=None))
            if self._wake_read in woken:
                with contextlib.suppress(OSError):
                    self._wake_read.recv(4096)
            if self._signals:
                continue  # a stop comes before anything the workers did meanwhile
            for slot in self.slots:
                if slot.ready is not None and slot.ready in woken:
                    self._took_up(slot)
                if slot.process is not None and slot.process.sentinel in woken:
                    failed = self._exited(slot)
                    if failed:
                        return 2
            if not self._announced and all(slot.serving for slot in self.slots):
                self._announced = True
                pids = ", ".join(str(slot.process.pid) for slot in self.slots if slot.process is not None)
                print(
                    f"guardrail: {len(self.slots)} workers serving (pids {pids}), "
                    f"ready after {time.monotonic() - self._began:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )

    def _start(self, slot: _Slot) -> None:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker,
            args=(slot.index, self.settings, self.options, self.sock, send),
            name=f"guardrail-worker-{slot.index}",
        )
        process.start()
        send.close()  # the worker holds its own copy: when it dies, the pipe says so
        slot.process, slot.ready, slot.serving = process, receive, False
        slot.started, slot.restart_at = time.monotonic(), None
        logger.debug("worker %d started [pid %s]", slot.index, process.pid)

    def _took_up(self, slot: _Slot) -> None:
        assert slot.ready is not None and slot.process is not None
        with contextlib.suppress(EOFError, OSError):  # EOF: it died first, which its sentinel tells
            slot.ready.recv_bytes()
            slot.serving = True
        slot.ready.close()
        slot.ready = None
        if slot.serving and self._announced:
            logger.info("worker %d [pid %s] serving again", slot.index, slot.process.pid)

    def _exited(self, slot: _Slot) -> bool:
        """Reap a worker that exited; True when it failed to start, which stops everything."""
        pid, code = self._reap(slot)
        if not slot.serving and code is not None and code > 0:
            # Its own error went to stderr; the same settings would fail the same way again.
            logger.error("worker %d [pid %s] could not start (exit code %s): stopping", slot.index, pid, code)
            return True
        slot.restart_at = max(time.monotonic(), slot.started + RESTART_DELAY)
        logger.warning("worker %d [pid %s] exited (%s): restarting it", slot.index, pid, _describe_exit(code))
        return False

    def _reap(self, slot: _Slot) -> tuple[int | None, int | None]:
        process = slot.process
        assert process is not None
        process.join()
        pid, code = process.pid, process.exitcode
        if pid is not None and os.environ.get(MULTIPROCESS_ENV):
            from prometheus_client import multiprocess

            # Its live gauges go; its counters stay, so totals survive restarts.
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        process.close()
        if slot.ready is not None:
            slot.ready.close()
        slot.process, slot.ready = None, None
        return pid, code

    def _hang_up(self) -> None:
        logger.info("SIGHUP: passed on to every worker (each reloads its classifier)")
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGHUP)

    def _stop_all(self) -> None:
        """SIGTERM to every worker, uvicorn's graceful shutdown; killed if not gone in time."""
        running = [slot for slot in self.slots if slot.process is not None]
        for slot in running:
            assert slot.process is not None and slot.process.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.options.graceful + STOP_MARGIN
        while running:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sentinels = [slot.process.sentinel for slot in running if slot.process is not None]
            woken = multiprocessing.connection.wait(sentinels, left)
            for slot in list(running):
                if slot.process is not None and slot.process.sentinel in woken:
                    self._reap(slot)
                    running.remove(slot)
        for slot in running:
            assert slot.process is not None
            logger.error("worker %d [pid %s] did not stop in time: killed", slot.index, slot.process.pid)
            slot.process.kill()
            self._reap(slot)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


# --- in the worker ---------------------------------------------------------------------------------


class _Stop:
    """SIGINT and SIGTERM before uvicorn takes them over (and after it hands them back): stop serving."""

    def __init__(self) -> None:
        self.requested = False
        self.server: uvicorn.Server | None = None  # once there is one

    def __call__(self, sig: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True


def _worker(
    index: int, settings: Settings, options: ServeOptions, sock: socket.socket, ready: Connection
) -> None:
    """One worker process: load the guard, then serve on ``sock`` until told to stop."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if _HANGUP is not None:
        # Until the app's lifespan handles it (a classifier reload), a SIGHUP must not end the worker.
        signal.signal(_HANGUP, signal.SIG_IGN)
    _stop_with_parent()
    logging.basicConfig(
        level=options.log_level.upper(), format=f"%(levelname)s:     %(name)s [w{index}]: %(message)s"
    )
    try:
        from guardrail.guard import Guard
        from guardrail.proxy import create_app

        settings = for_worker(settings, index)
        guard = Guard.from_settings(settings)
        app = create_app(settings, guard)
    except GuardrailError as exc:
        print(f"guardrail: error: worker {index}: {exc}", file=sys.stderr, flush=True)
        sys.exit(STARTUP_FAILURE)
    logger.info(
        "worker %d [pid %d]: %s, threshold %+.4f, log %s",
        index, os.getpid(), guard.document.title, guard.threshold, settings.log_path or "off",
    )  # fmt: skip
    config = uvicorn.Config(
        app,
        log_level=options.log_level,
        access_log=options.access_log,
        timeout_graceful_shutdown=options.graceful,
    )
    server = _WorkerServer(config, ready)
    stop.server = server
    if stop.requested:
        return
    server.run(sockets=[sock])


def _stop_with_parent() -> None:
    """Stop gracefully if the parent dies (killed with SIGKILL, say) rather than serve on orphaned."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="guardrail-parent-watch", daemon=True).start()


class _WorkerServer(uvicorn.Server):
    """uvicorn's server, telling the parent once it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready: Connection) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            with contextlib.suppress(OSError):  # the parent is gone: the watch stops this worker
                self._ready.send_bytes(b"serving")
            self._ready.close()
