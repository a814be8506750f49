"""ClientWatch: a client that leaves cancels what the handler awaits; other cancellations are not its."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from guardrail.asgi import ClientWatch


def receiver(disconnect_after: float | None) -> Any:
    async def receive() -> dict[str, Any]:
        if disconnect_after is None:
            await asyncio.Event().wait()  # never
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    return receive


def test_a_client_that_leaves_cancels_the_await_and_is_told_apart() -> None:
    async def handler() -> tuple[bool, str]:
        watch = ClientWatch(receiver(0.05))
        try:
            await asyncio.sleep(5)
            return watch.left, "finished"
        except asyncio.CancelledError:
            assert watch.left
            watch.settle()
            await asyncio.sleep(0)  # clean-up can still await once settled
            return watch.left, "client left"
        finally:
            watch.stop()

    assert asyncio.run(handler()) == (True, "client left")


def test_a_cancellation_from_elsewhere_goes_on() -> None:
    watches: list[ClientWatch] = []

    async def handler() -> None:
        watch = ClientWatch(receiver(None))
        watches.append(watch)
        try:
            await asyncio.sleep(5)
        finally:
            watch.stop()

    async def main() -> None:
        task = asyncio.ensure_future(handler())
        await asyncio.sleep(0.05)
        task.cancel()  # the server shutting down, say
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert watches[0].left is False


def test_a_stopped_watch_cancels_nothing() -> None:
    async def handler() -> str:
        watch = ClientWatch(receiver(0.05))
        watch.stop()
        await asyncio.sleep(0.2)  # the client leaves meanwhile
        return "finished"

    assert asyncio.run(handler()) == "finished"


def test_the_watch_starts_listening_only_after_its_delay() -> None:
    calls: list[float] = []

    async def receive() -> dict[str, Any]:
        calls.append(asyncio.get_running_loop().time())
        return {"type": "http.disconnect"}  # the client has already gone

    async def handler(delay: float) -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        watch = ClientWatch(receive, delay=delay)
        try:
            await asyncio.sleep(5)
            return False, 0.0
        except asyncio.CancelledError:
            watch.settle()
            return watch.left, loop.time() - start
        finally:
            watch.stop()

    left, after = asyncio.run(handler(0.1))
    assert left and 0.1 <= after < 1.0
    assert len(calls) == 1

    calls.clear()
    left, after = asyncio.run(handler(0))  # no delay: at once
    assert left and after < 0.1


def test_a_watch_stopped_within_its_delay_never_listens() -> None:
    calls: list[int] = []

    async def receive() -> dict[str, Any]:
        calls.append(1)
        return {"type": "http.disconnect"}

    async def handler() -> str:
        watch = ClientWatch(receive, delay=0.05)
        await asyncio.sleep(0.01)  # a fast reply: done before the delay
        watch.stop()
        await asyncio.sleep(0.2)
        return "finished"

    assert asyncio.run(handler()) == "finished"
    assert calls == []
