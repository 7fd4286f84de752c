"""Body reads cut by the process-wide deadline sweep, and only by it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.gateway.body_reading import BodyReader, BodyTimeoutError, BodyTooLargeError


def chunks(*parts: bytes, stall: bool = False):
    queue = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1 or stall}
        for i, part in enumerate(parts)
    ]

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()  # a client that sends nothing more
        raise AssertionError

    return receive


async def test_a_body_in_several_chunks_is_read_whole() -> None:
    assert await BodyReader(1.0).read(chunks(b"a=1", b"&b=2"), None, 100) == b"a=1&b=2"


async def test_a_body_over_the_limit_is_refused() -> None:
    with pytest.raises(BodyTooLargeError):
        await BodyReader(1.0).read(chunks(b"x" * 60, b"x" * 60), None, 100)
    with pytest.raises(BodyTooLargeError):
        await BodyReader(1.0).read(chunks(b""), "101", 100)


async def test_a_stalled_body_is_cut_within_a_quarter_past_the_timeout() -> None:
    reader = BodyReader(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BodyTimeoutError):
        await reader.read(chunks(b"a=", stall=True), None, 100)
    assert 0.2 <= loop.time() - started < 0.4
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    # The reader goes on serving reads after a cut.
    assert await reader.read(chunks(b"a=1"), None, 100) == b"a=1"


async def test_a_cancellation_from_elsewhere_is_not_taken_for_a_timeout() -> None:
    read = asyncio.create_task(BodyReader(10.0).read(chunks(b"a=", stall=True), None, 100))
    await asyncio.sleep(0.01)
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
