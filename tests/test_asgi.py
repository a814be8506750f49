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
