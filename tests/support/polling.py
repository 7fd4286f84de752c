"""The one way a test waits for something another process does: poll until it holds."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    what: str = "",
    *,
    timeout_s: float = 20.0,
    every_s: float = 0.1,
) -> T:
    """The first truthy result of `check` (a function or a coroutine function), polled every
    `every_s`; AssertionError naming `what` and the last result after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = check()
        last: T = await result if inspect.isawaitable(result) else result  # type: ignore[assignment]  # T | Awaitable[T] narrowed by hand
        if last:
            return last
        if loop.time() >= deadline:
            raise AssertionError(f"not true after {timeout_s:g}s: {what or check!r}; last {last!r}")
        await asyncio.sleep(every_s)
