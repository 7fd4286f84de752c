"""The idle sweeper: closes sessions idle past the window, every interval, in every replica.

Replicas need no coordination: each batch claims rows with FOR UPDATE SKIP LOCKED (see
`SessionStore.close_idle_batch`), so two sweepers never close the same session or record its
closed event twice.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Counter, Gauge

from infra.events import wait_any
from infra.log import get_logger
from services.live_session.store import SessionStore

SWEEP_BATCH = 100

_log = get_logger(__name__)

# Every replica reports the same count (it is read from the database): aggregate with max().
LIVE_SESSIONS = Gauge(
    "snapsell_live_session_active_sessions",
    "Live sessions active right now, all tenants (refreshed at each sweep)",
)
IDLE_CLOSED = Counter(
    "snapsell_live_session_idle_closed_total",
    "Sessions the sweeper closed because they stayed idle past the inactivity window",
)


class IdleSweeper:
    def __init__(self, store: SessionStore, interval_s: float, batch: int = SWEEP_BATCH) -> None:
        self._store = store
        self._interval_s = interval_s
        self._batch = batch

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep now, then every interval, until `stop` is set. A failed sweep (database
        down) is logged and retried at the next interval, never fatal."""
        while not stop.is_set():
            try:
                closed = await self._store.close_idle_sessions(self._batch, stop=stop)
            except Exception as error:
                _log.warning("live_session.sweep_failed", extra={"fields": {"error": str(error)}})
            else:
                if closed:
                    IDLE_CLOSED.inc(closed)
                    _log.info("live_session.idle_closed", extra={"fields": {"count": closed}})
            try:
                LIVE_SESSIONS.set(await self._store.count_live())
            except Exception as error:  # metrics must never stop the sweeper
                _log.warning("live_session.count_failed", extra={"fields": {"error": str(error)}})
            await wait_any(stop, timeout_s=self._interval_s)
