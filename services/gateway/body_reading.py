"""Reading a webhook's body: bounded in size, and in time, so that a client sending half a body
and then nothing holds no request open past the read timeout.

One timer serves every read of the process: each read registers its task with a deadline, and
a sweep every quarter of the timeout cancels the reads past theirs (so a read is cut between 1
and 1.25 timeouts after it began). A timer per request (`asyncio.timeout`) cost about 9 µs,
a few percent of a webhook's whole work; registering costs a dict entry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from starlette.types import Receive


class BodyTooLargeError(Exception):
    pass


class BodyTimeoutError(Exception):
    """The client did not send its whole body within the read timeout."""


class BodyReader:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout_s = timeout_s
        self._sweep_every_s = timeout_s / 4
        self._clock = clock
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._cut: set[asyncio.Task[Any]] = set()
        self._sweep_timer: asyncio.TimerHandle | None = None

    async def read(self, receive: Receive, declared: str | None, limit: int) -> bytes:
        """The whole body; BodyTooLargeError past `limit` bytes (declared or received),
        BodyTimeoutError when it does not arrive in time."""
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLargeError
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = self._clock() + self._timeout_s
        if self._sweep_timer is None:
            self._arm_sweep()
        try:
            return await _receive_body(receive, limit)
        except asyncio.CancelledError:
            if task not in self._cut:  # the server's cancellation, not ours
                raise
            self._cut.discard(task)
            task.uncancel()
            raise BodyTimeoutError from None
        finally:
            del self._deadlines[task]

    def _arm_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweep_timer = loop.call_later(self._sweep_every_s, self._sweep)

    def _sweep(self) -> None:
        now = self._clock()
        for task, deadline in self._deadlines.items():
            if deadline <= now and task not in self._cut:
                self._cut.add(task)
                task.cancel()
        # Idle, no timer runs; the next read arms one.
        self._sweep_timer = None
        if self._deadlines:
            self._arm_sweep()


async def _receive_body(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
