from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pytest

from guardrail import batching
from guardrail.batching import Batcher

T = TypeVar("T")


class Recorder:
    """A batch function that doubles its items and records every batch; a held one waits for the test."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Semaphore(0)  # released once per call
        self._gate = threading.Semaphore(0)
        if not hold:
            self.open()

    def release(self, batches: int = 1) -> None:
        """Let this many held batches finish."""
        self._gate.release(batches)

    def open(self) -> None:
        """Stop holding batches."""
        self._gate.release(10_000)

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.release()
        if not self._gate.acquire(timeout=5):
            raise TimeoutError("the test never released the batch")
        if any(item < 0 for item in items):
            raise ValueError(f"negative item in {list(items)}")
        return [item * 2 for item in items]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recorder = Recorder(hold=True)
    yield recorder
    recorder.open()  # never leave a worker thread waiting


def make(function: Callable[[Sequence[int]], Sequence[int]], **kwargs: int) -> Batcher[int, int]:
    return Batcher(function, **kwargs)


def run(batcher: Batcher[int, int], main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, then close the batcher whatever happened."""
    try:
        return asyncio.run(main)
    finally:
        batcher.close()


async def wait_until_started(recorder: Recorder) -> None:
    """Let the loop dispatch, then wait (off the loop) for a worker to enter the function."""
    assert await asyncio.to_thread(recorder.entered.acquire, True, 5)


async def settle() -> None:
    """Give newly created tasks a chance to reach ``submit``."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_results_go_to_their_submitters_under_concurrency() -> None:
    recorder = Recorder()
    batcher = make(recorder, workers=2, max_batch=8)

    async def main() -> list[int]:
        return await asyncio.gather(*(batcher.submit(i) for i in range(100)))

    results = run(batcher, main())
    assert results == [i * 2 for i in range(100)]
    assert sorted(item for batch in recorder.batches for item in batch) == list(range(100))
    assert batcher.items == 100
    assert batcher.batches == len(recorder.batches)
    # 100 items cannot fit in fewer than 13 batches of 8, and concurrency must have grouped some.
    assert 13 <= batcher.batches < 100
    assert all(len(batch) <= 8 for batch in recorder.batches)


def test_items_submitted_while_busy_form_the_next_batch(recorder: Recorder) -> None:
    batcher = make(recorder, workers=1, max_batch=32)

    async def main() -> list[int]:
        first = asyncio.create_task(batcher.submit(0))
        await wait_until_started(recorder)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        await settle()
        assert batcher.depth == 5  # waiting for the one worker
        recorder.open()
        return await asyncio.gather(first, *rest)

    results = run(batcher, main())
    assert results == [0, 2, 4, 6, 8, 10]
    assert recorder.batches == [[0], [1, 2, 3, 4, 5]]
    assert (batcher.batches, batcher.items) == (2, 6)
    assert batcher.depth == 0


def test_max_batch_is_respected(recorder: Recorder) -> None:
    batcher = make(recorder, workers=1, max_batch=3)

    async def main() -> list[int]:
        first = asyncio.create_task(batcher.submit(0))
        await wait_until_started(recorder)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 8)]
        await settle()
        recorder.open()
        return await asyncio.gather(first, *rest)

    results = run(batcher, main())
    assert results == [i * 2 for i in range(8)]
    assert recorder.batches == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert (batcher.batches, batcher.items) == (4, 8)


def test_two_workers_run_two_batches_at_once(recorder: Recorder) -> None:
    batcher = make(recorder, workers=2, max_batch=32)

    async def main() -> list[int]:
        tasks = [asyncio.create_task(batcher.submit(0))]
        await wait_until_started(recorder)
        tasks.append(asyncio.create_task(batcher.submit(1)))
        await wait_until_started(recorder)
        # Both batches are running although the first one has not finished.
        assert batcher.batches == 2
        assert batcher.depth == 0
        recorder.open()
        return await asyncio.gather(*tasks)

    assert run(batcher, main()) == [0, 2]
    assert sorted(recorder.batches) == [[0], [1]]


def test_an_error_reaches_every_submitter_of_its_batch_and_the_batcher_keeps_working(
    recorder: Recorder,
) -> None:
    batcher = make(recorder, workers=1, max_batch=32)

    async def main() -> tuple[list[int | BaseException], list[int]]:
        first = asyncio.create_task(batcher.submit(1))
        await wait_until_started(recorder)
        bad = [asyncio.create_task(batcher.submit(i)) for i in (2, -1, 3)]
        await settle()
        recorder.open()
        assert await first == 2
        failed = await asyncio.gather(*bad, return_exceptions=True)
        after = await asyncio.gather(batcher.submit(4), batcher.submit(5))
        return failed, after

    failed, after = run(batcher, main())
    assert recorder.batches[:2] == [[1], [2, -1, 3]]
    assert all(isinstance(error, ValueError) for error in failed)
    assert "negative item in [2, -1, 3]" in str(failed[0])
    assert after == [8, 10]
    assert batcher.depth == 0


def test_a_cancelled_waiting_submitter_is_left_out(recorder: Recorder) -> None:
    batcher = make(recorder, workers=1, max_batch=32)

    async def main() -> list[int]:
        first = asyncio.create_task(batcher.submit(0))
        await wait_until_started(recorder)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
        await settle()
        tasks[1].cancel()
        await settle()
        recorder.open()
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        return await asyncio.gather(first, tasks[0], tasks[2])

    assert run(batcher, main()) == [0, 2, 6]
    assert recorder.batches == [[0], [1, 3]]


def test_a_submitter_cancelled_while_its_batch_runs_does_not_break_the_others(recorder: Recorder) -> None:
    batcher = make(recorder, workers=1, max_batch=32)

    async def main() -> list[int | BaseException]:
        first = asyncio.create_task(batcher.submit(0))
        await wait_until_started(recorder)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
        await settle()
        recorder.release()  # the first batch ends and [1, 2, 3] starts
        await wait_until_started(recorder)
        tasks[1].cancel()
        await settle()
        recorder.open()
        results = await asyncio.gather(first, *tasks, return_exceptions=True)
        return [*results, await batcher.submit(4)]

    results = run(batcher, main())
    assert recorder.batches == [[0], [1, 2, 3], [4]]
    assert results[:2] == [0, 2]
    assert isinstance(results[2], asyncio.CancelledError)
    assert results[3:] == [6, 8]


def test_a_lone_submit_starts_at_once() -> None:
    called: list[float] = []

    def function(items: Sequence[int]) -> list[int]:
        called.append(time.perf_counter())
        return list(items)

    batcher = make(function, workers=1, max_batch=32)

    async def main() -> float:
        await batcher.submit(0)  # warm the worker thread up
        start = time.perf_counter()
        # No timer waits for company: the waiting worker takes it at once.
        assert await batcher.submit(7) == 7
        return start

    start = run(batcher, main())
    assert called[-1] - start < 0.05


def test_at_low_load_the_worker_that_went_idle_last_does_the_work() -> None:
    # Waking the workers in turn would leave each one's caches cold by the time it is woken again.
    threads: list[str] = []

    def function(items: Sequence[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        return list(items)

    batcher = make(function, workers=3, max_batch=32)

    async def main() -> list[int]:
        await batcher.submit(-1)
        await asyncio.sleep(0.2)  # every worker has started and is waiting
        threads.clear()
        return [await batcher.submit(i) for i in range(20)]

    assert run(batcher, main()) == list(range(20))
    assert len(threads) == 20
    assert len(set(threads)) == 1


def test_close_ends_every_worker_once_the_waiting_items_ran(recorder: Recorder) -> None:
    batcher = make(recorder, workers=3, max_batch=1)

    async def main() -> list[int]:
        submitted = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
        await wait_until_started(recorder)
        batcher.close()
        with pytest.raises(RuntimeError, match="closed"):
            batcher.enqueue(9)
        recorder.open()
        return await asyncio.wait_for(asyncio.gather(*submitted), timeout=5)

    assert run(batcher, main()) == [0, 2, 4, 6]
    workers = batcher._threads
    for thread in workers:
        thread.join(timeout=5)
    assert len(workers) == 3
    assert not any(thread.is_alive() for thread in workers)


def linger(monkeypatch: pytest.MonkeyPatch, gap: float, most: float, batch: int = 8) -> None:
    monkeypatch.setattr(batching, "LINGER_GAP", gap)
    monkeypatch.setattr(batching, "LINGER_MAX", most)
    monkeypatch.setattr(batching, "LINGER_BATCH", batch)


def test_with_no_other_worker_busy_nobody_lingers(monkeypatch: pytest.MonkeyPatch) -> None:
    linger(monkeypatch, gap=10.0, most=10.0)
    called: list[float] = []

    def function(items: Sequence[int]) -> list[int]:
        called.append(time.perf_counter())
        return list(items)

    batcher = make(function, workers=2, max_batch=32)

    async def main() -> float:
        await batcher.submit(0)
        start = time.perf_counter()
        assert await batcher.submit(7) == 7
        return start

    start = run(batcher, main())
    assert called[-1] - start < 1.0  # not the 10 s a lingering worker could wait


def test_nobody_lingers_while_another_worker_is_free(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    linger(monkeypatch, gap=30.0, most=30.0)
    batcher = make(recorder, workers=3, max_batch=32)

    async def main() -> list[int]:
        tasks = [asyncio.create_task(batcher.submit(0))]
        await wait_until_started(recorder)  # one of three busy
        tasks.append(asyncio.create_task(batcher.submit(1)))
        await wait_until_started(recorder)  # at once, not after the 30 s gap
        recorder.open()
        return await asyncio.gather(*tasks)

    assert run(batcher, main()) == [0, 2]
    assert recorder.batches == [[0], [1]]


def test_under_load_a_free_worker_waits_while_messages_keep_coming(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrivals 20 ms apart, well inside a 1 s gap: without lingering the free worker would run the
    # first one alone.
    linger(monkeypatch, gap=1.0, most=30.0, batch=8)
    batcher = make(recorder, workers=2, max_batch=32)

    async def main() -> list[int]:
        tasks = [asyncio.create_task(batcher.submit(0))]
        await wait_until_started(recorder)  # one worker busy
        for i in range(1, 4):
            tasks.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.02)
        start = time.perf_counter()
        await wait_until_started(recorder)
        # It took them once arrivals paused for the gap, long before the 30 s cap.
        assert time.perf_counter() - start < 10
        recorder.open()
        return await asyncio.gather(*tasks)

    results = run(batcher, main())
    assert results == [0, 2, 4, 6]
    assert recorder.batches == [[0], [1, 2, 3]]


def test_lingering_ends_once_enough_messages_wait(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    linger(monkeypatch, gap=30.0, most=30.0, batch=3)
    batcher = make(recorder, workers=2, max_batch=32)

    async def main() -> list[int]:
        tasks = [asyncio.create_task(batcher.submit(0))]
        await wait_until_started(recorder)
        tasks += [asyncio.create_task(batcher.submit(i)) for i in range(1, 4)]
        await wait_until_started(recorder)  # within the recorder's 5 s, not the 30 s gap
        recorder.open()
        return await asyncio.gather(*tasks)

    results = run(batcher, main())
    assert results == [0, 2, 4, 6]
    assert recorder.batches == [[0], [1, 2, 3]]


def test_lingering_stops_at_its_cap_while_messages_keep_coming(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    linger(monkeypatch, gap=1.0, most=0.2, batch=1000)
    batcher = make(recorder, workers=2, max_batch=1000)

    async def main() -> list[int]:
        tasks = [asyncio.create_task(batcher.submit(0))]
        await wait_until_started(recorder)
        started = asyncio.create_task(wait_until_started(recorder))
        i = 1
        while not started.done():  # a message every 10 ms, never a 1 s pause
            tasks.append(asyncio.create_task(batcher.submit(i)))
            i += 1
            assert i < 300, "the free worker never stopped lingering"
            await asyncio.sleep(0.01)
        recorder.open()
        return await asyncio.gather(*tasks)

    results = run(batcher, main())
    assert results == [i * 2 for i in range(len(results))]
    # The cap of 0.2 s took what had come by then: about 20 messages, far below the 1 s gap's worth.
    assert recorder.batches == [[0], list(range(1, len(results)))]
    assert 5 < len(results) < 100


def test_a_worker_that_finishes_takes_what_a_lingering_one_waits_for(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    linger(monkeypatch, gap=30.0, most=30.0)
    batcher = make(recorder, workers=2, max_batch=32)

    async def main() -> list[int]:
        first = asyncio.create_task(batcher.submit(0))
        await wait_until_started(recorder)
        second = asyncio.create_task(batcher.submit(1))  # the other worker lingers on it
        await settle()
        recorder.release()  # the busy worker finishes, sees nobody busy, and takes it at once
        await wait_until_started(recorder)
        recorder.open()
        return await asyncio.wait_for(asyncio.gather(first, second), timeout=5)

    results = run(batcher, main())
    assert results == [0, 2]
    assert recorder.batches == [[0], [1]]


def test_invalid_sizes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(lambda items: items, workers=0)
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(lambda items: items, max_batch=0)


def test_a_wrong_number_of_results_is_an_error_not_a_hang() -> None:
    batcher = make(lambda items: list(items)[:-1], workers=1, max_batch=32)

    async def main() -> list[int | BaseException]:
        return await asyncio.wait_for(
            asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True), timeout=0.3
        )

    results = run(batcher, main())
    assert all(isinstance(result, Exception) for result in results)
