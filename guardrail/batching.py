"""A micro-batcher that keeps the encoder off the event loop and groups concurrent messages.

Requests hand their message to ``submit`` and await the result. ``workers`` threads (onnxruntime
releases the GIL, so two workers use two cores) each take everything waiting, up to ``max_batch``, run
it as one batch, hand the results back to the event loop and take the next batch themselves. There is
no timer, so a lone request is judged at once, and under load the queue that forms while the workers
are busy becomes the next batch. Workers never wait for the event loop to hand them work, so a busy
loop does not leave a core idle between batches; the loop only enqueues and takes results back. An
arrival wakes the worker that went idle last, so at low load one warm worker does the work while the
others sleep.

Under load a worker may linger a moment before taking a short queue (see ``LINGER_GAP``): a batch of
one costs the encoder about 1.3x per message what a batch of eight does, and clients answered together
send their next messages together.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

# When every other worker is busy and fewer than LINGER_BATCH messages wait, the free worker waits
# while more keep coming, at most LINGER_GAP apart and LINGER_MAX in all, before taking them. (With
# another worker free, the load is below what the workers can do, and nothing is gained by waiting;
# it also means at most one worker lingers, the one an arrival's notify() wakes.) Measured with
# benchmarks/proxy_speed.py's load at 32 clients: 5% more requests/s and 4% less CPU per request (a
# batch is otherwise often one or two messages, taken from the head of a burst); at 2 to 8 clients
# no change beyond the noise (2 workers, the default). With any other worker free nobody lingers, so a
# lone request starts at once.
LINGER_GAP = 0.00025  # seconds
LINGER_MAX = 0.002
LINGER_BATCH = 8  # the bare encoder's cost per message levels off from about here

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs ``function(items) -> results`` on batches of concurrently submitted items."""

    def __init__(self, function: Callable[[Sequence[T]], Sequence[R]], workers: int = 2, max_batch: int = 32):
        if workers < 1 or max_batch < 1:
            raise ValueError("workers and max_batch must be at least 1")
        self.function = function
        self.workers = workers
        self.max_batch = max_batch
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._lock = threading.Lock()
        # Each worker waits on its own condition, so an arrival can wake the one that went idle last
        # (``threading.Condition.notify`` wakes the longest waiting, so the workers took turns, each
        # one cold). Measured through the proxy at one client, interleaved with workers taking turns in
        # two runs of 10 and 12 rounds: 0.54 and 0.31 ms less latency (medians; better in 17 of 22
        # rounds), and 0.4 to 0.6 ms less CPU per message in the encoder threads. No change in
        # requests/s at 4 and 32 clients.
        self._idle: list[threading.Condition] = []  # waiting for work; the last went idle last
        self._lingering: threading.Condition | None = None
        self._closed = False
        self._busy = 0  # workers running a batch
        self._threads: list[threading.Thread] = []
        self.batches = 0  # how many batches ran: with ``items``, the mean batch size
        self.items = 0

    @property
    def depth(self) -> int:
        """Items waiting for a free worker."""
        return len(self._waiting)

    async def submit(self, item: T) -> R:
        """The result for one item, computed in a batch with whatever else is waiting."""
        return await self.enqueue(item)

    def enqueue(self, item: T) -> asyncio.Future[R]:
        """Queue one item now, from the event loop; the future gets its result.

        The item is in the queue when this returns, so the caller can do other work while the
        encoder runs and await the future after.
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if not self._threads:
                self._start()
            self._waiting.append((item, future))
            if self._lingering is not None:
                self._lingering.notify()
            elif self._idle:
                self._idle.pop().notify()
        return future

    def close(self) -> None:
        """Stop the workers once the batches they are running finish; waiting items still run."""
        with self._lock:
            self._closed = True
            for waiting in self._idle:
                waiting.notify()
            self._idle.clear()
            if self._lingering is not None:
                self._lingering.notify()

    def _start(self) -> None:
        for i in range(self.workers):
            wake = threading.Condition(self._lock)
            thread = threading.Thread(
                target=self._work, args=(wake,), name=f"guardrail-encoder_{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _take(self, wake: threading.Condition) -> list[tuple[T, asyncio.Future[R]]] | None:
        """The next batch, waiting on ``wake`` for one; None once closed and drained. Holds ``_lock``."""
        while True:
            while not self._waiting and not self._closed:
                self._idle.append(wake)
                wake.wait()
                if wake in self._idle:  # not woken by an arrival (Python promises no spurious wake-ups)
                    self._idle.remove(wake)
            if not self._waiting:
                return None
            if self._others_busy() and len(self._waiting) < LINGER_BATCH:
                self._lingering = wake
                try:
                    self._linger(wake)
                finally:
                    self._lingering = None
            taken = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch))]
            # A client that went away while waiting needs no answer.
            batch = [(item, future) for item, future in taken if not future.cancelled()]
            if batch:
                self._busy += 1
                return batch

    def _others_busy(self) -> bool:
        """Whether every worker but the one asking is running a batch (never, with one worker)."""
        return 0 < self._busy == self.workers - 1

    def _linger(self, wake: threading.Condition) -> None:
        """Wait on ``wake`` while messages keep arriving (see ``LINGER_GAP``). Holds ``_lock``."""
        deadline = time.monotonic() + LINGER_MAX
        while self._others_busy() and not self._closed and 0 < len(self._waiting) < LINGER_BATCH:
            seen = len(self._waiting)
            quiet = min(time.monotonic() + LINGER_GAP, deadline)
            while len(self._waiting) == seen and not self._closed:
                left = quiet - time.monotonic()
                if left <= 0:
                    return
                wake.wait(left)

    def _work(self, wake: threading.Condition) -> None:
        with self._lock:
            batch = self._take(wake)
        while batch is not None:
            self.batches += 1
            self.items += len(batch)
            results: Sequence[R] = ()
            error: BaseException | None = None
            try:
                results = self.function([item for item, _ in batch])
                if len(results) != len(batch):
                    error = RuntimeError(
                        f"the batch function returned {len(results)} results for {len(batch)} items"
                    )
            except Exception as exc:
                error = exc
            # Results go out under the lock, which this worker keeps until it waits again: a request
            # answered here and sent again at once finds this worker idle, and wakes it, not a cold one.
            with self._lock:
                self._busy -= 1
                _hand_back(batch, results, error)
                batch = self._take(wake)


def _hand_back(
    batch: list[tuple[T, asyncio.Future[R]]], results: Sequence[R], error: BaseException | None
) -> None:
    """Set each future's result (or the error) on its own event loop."""
    loops: dict[asyncio.AbstractEventLoop, list[int]] = {}
    for index, (_, future) in enumerate(batch):
        loops.setdefault(future.get_loop(), []).append(index)
    for loop, indices in loops.items():
        deliveries = [(batch[i][1], None if error else results[i]) for i in indices]
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_deliver, deliveries, error)


def _deliver(deliveries: list[tuple[asyncio.Future[R], R | None]], error: BaseException | None) -> None:
    for future, result in deliveries:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
