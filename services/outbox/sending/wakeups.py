"""When the sending pipeline claims again, besides its poll: when an enqueue commits (LISTEN
`outbox_due`; the enqueue NOTIFYs; debounced, so enqueues committed a few ms apart are claimed
together), and when the earliest retry it scheduled is due."""

from __future__ import annotations

import asyncio

import asyncpg

from infra.db import DATABASE_UNAVAILABLE
from infra.events import DebouncedWakeup, wait_any
from infra.log import get_logger
from services.outbox.store import DUE_CHANNEL

_log = get_logger(__name__)
_DB_ERRORS: tuple[type[Exception], ...] = (*DATABASE_UNAVAILABLE, asyncpg.PostgresError)


class DueWakeups:
    """`event` is set by a NOTIFY or by the retry timer; the worker clears it before a claim."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.event = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._notified = DebouncedWakeup(self.event)

    async def listen(self, stop: asyncio.Event) -> None:
        """LISTEN until `stop`, on one connection of the pool; reconnects after a failure."""
        while not stop.is_set():
            try:
                async with self._pool.acquire() as conn:
                    await conn.add_listener(DUE_CHANNEL, self._notified)
                    try:
                        self.event.set()  # whatever was enqueued while we were not listening
                        while not stop.is_set() and not conn.is_closed():
                            await wait_any(stop, timeout_s=1.0)
                    finally:
                        if not conn.is_closed():
                            await conn.remove_listener(DUE_CHANNEL, self._notified)
            except _DB_ERRORS as error:
                _log.warning("outbox.listen_failed", extra={"fields": {"error": str(error)}})
                await wait_any(stop, timeout_s=1.0)

    def at(self, delay_s: float) -> None:
        """Wake in `delay_s`, unless an earlier wake-up is already set."""
        loop = asyncio.get_running_loop()
        at = loop.time() + max(0.0, delay_s)
        if self._timer is not None and self._timer_at > loop.time() and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self.event.set)

    def close(self) -> None:
        self._notified.cancel()
        if self._timer is not None:
            self._timer.cancel()
