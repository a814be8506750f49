"""A micro-batcher that keeps the encoder off the event loop and groups concurrent messages.

Requests hand their message to ``submit`` and await the result. Up to ``workers`` batches run at once
in a thread pool (onnxruntime releases the GIL, so two workers use two cores). A batch starts as soon
as a worker is free and takes everything waiting, up to ``max_batch``: there is no timer, so a lone
request is judged at once, and under load the queue that forms while the workers are busy becomes the
next batch. All bookkeeping happens on the event loop's thread, so it needs no lock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

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
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="guardrail-encoder")
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._running = 0
        self.batches = 0  # how many batches ran: with ``items``, the mean batch size
        self.items = 0

    @property
    def depth(self) -> int:
        """Items waiting for a free worker."""
        return len(self._waiting)

    async def submit(self, item: T) -> R:
        """The result for one item, computed in a batch with whatever else is waiting."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._start_batches()
        return await future

    def close(self) -> None:
        """Stop the worker threads once the running batches finish."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _start_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting and self._running < self.workers:
            batch: list[tuple[T, asyncio.Future[R]]] = []
            while self._waiting and len(batch) < self.max_batch:
                item, future = self._waiting.popleft()
                if not future.cancelled():  # the client went away while waiting
                    batch.append((item, future))
            if not batch:
                continue
            self._running += 1
            self.batches += 1
            self.items += len(batch)
            items = [item for item, _ in batch]
            done = loop.run_in_executor(self._executor, self.function, items)
            done.add_done_callback(lambda task, batch=batch: self._finish(task, batch))  # type: ignore[misc]

    def _finish(self, task: asyncio.Future[Sequence[R]], batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self._running -= 1
        error = task.exception() if not task.cancelled() else asyncio.CancelledError()
        if error is None and len(task.result()) != len(batch):
            error = RuntimeError(
                f"the batch function returned {len(task.result())} results for {len(batch)} items"
            )
        if error is None:
            for (_, future), result in zip(batch, task.result(), strict=True):
                if not future.done():
                    future.set_result(result)
        else:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        self._start_batches()
