"""Running coroutines from plain pytest tests (no plugin): bounded, on uvloop like the node."""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return uvloop.run(bounded())


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def asyncio_whose_wait_for_drops_a_cancel() -> Any:
    """The asyncio module, as a module under test may be given it, except that ``wait_for`` behaves as
    Python 3.11's does when its awaitable finishes in the same loop turn as a cancellation: it returns
    the result and the cancellation is lost (python/cpython#86296). Here it is lost every time."""

    async def wait_for(aw: Any, timeout: float | None) -> Any:
        inner = asyncio.ensure_future(aw)
        while True:
            try:
                return await asyncio.shield(inner)
            except asyncio.CancelledError:
                if inner.cancelled():
                    raise

    proxy = types.SimpleNamespace(**vars(asyncio))
    proxy.wait_for = wait_for
    return proxy
