"""Writing the results of claims back in batches: one statement per batch (status, attempt
rows and events together), gathered for at most `flush_interval_s`, so hundreds of sends
cost one round trip. Sends never wait for this."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Sequence

import asyncpg
from prometheus_client import Counter

from infra.db import DATABASE_UNAVAILABLE
from infra.log import get_logger
from services.outbox.domain import MessageStatus, Resolution
from services.outbox.store import OutboxStore

RESOLUTIONS = Counter(
    "snapsell_outbox_resolutions_total",
    "Claims written back, by the status they left the message in",
    ["status"],
)
DEAD_LETTERS = Counter(
    "snapsell_outbox_dead_letters_total", "Messages dead-lettered, by reason", ["reason"]
)
BLOCKED_OPTOUT = Counter(
    "snapsell_outbox_blocked_optout_total", "Messages not sent because the recipient opted out"
)
LEASES_LOST = Counter(
    "snapsell_outbox_leases_lost_total", "Claims whose lease another worker took over"
)
_RESOLVED = {status: RESOLUTIONS.labels(status.value) for status in MessageStatus}
# The database is away or busy: the same write will work later.
_DB_UNAVAILABLE: tuple[type[Exception], ...] = (
    *DATABASE_UNAVAILABLE,
    asyncpg.TransactionRollbackError,
)
_log = get_logger(__name__)

Written = Callable[[Sequence[Resolution], set[uuid.UUID]], None]


class ResultWriter:
    def __init__(
        self,
        store: OutboxStore,
        worker_id: str,
        batch_size: int,
        flush_interval_s: float,
        on_written: Written,
    ) -> None:
        self._store = store
        self._worker_id = worker_id
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._on_written = on_written
        self._results: list[Resolution] = []
        self._ready = asyncio.Event()
        self._final = asyncio.Event()

    def add(self, resolution: Resolution) -> None:
        self._results.append(resolution)
        self._ready.set()

    def finish(self) -> None:
        """Write what is left without waiting, then let `run` return."""
        self._final.set()
        self._ready.set()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            await self._ready.wait()
            if not self._final.is_set() and len(self._results) < self._batch_size:
                # Let results gather for one statement; the sends themselves are not delayed.
                await asyncio.sleep(self._flush_interval_s)
            batch = self._results[: self._batch_size]
            if not batch:
                self._ready.clear()
                if self._final.is_set():
                    return
                continue
            try:
                written = await self._write_batch(batch)
            except _DB_UNAVAILABLE as error:
                _log.warning("outbox.flush_failed", extra={"fields": {"error": str(error)}})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            del self._results[: len(batch)]
            if not self._results and not self._final.is_set():  # once final, return next
                self._ready.clear()
            _count(batch, written)
            self._on_written(batch, written)

    async def _write_batch(self, batch: list[Resolution]) -> set[uuid.UUID]:
        """Database outages propagate (the batch is kept and written again: every write is
        conditional, so a repeat changes nothing). A result the database refuses (a bug) is
        dropped alone: its lease runs out and the next claim reconciles the message."""
        try:
            return await self._write(batch)
        except _DB_UNAVAILABLE as error:
            if not isinstance(error, asyncpg.DataError):  # DataError: unencodable value
                raise
            refused: Exception = error
        except Exception as error:
            refused = error
        _log.error("outbox.flush_refused", extra={"fields": {"error": repr(refused)}})
        written: set[uuid.UUID] = set()
        for resolution in batch:
            try:
                written |= await self._write([resolution])
            except _DB_UNAVAILABLE as error:
                if not isinstance(error, asyncpg.DataError):
                    raise
                _log_dropped(resolution, error)
            except Exception as error:
                _log_dropped(resolution, error)
        return written

    async def _write(self, batch: list[Resolution]) -> set[uuid.UUID]:
        try:
            return await self._store.record_resolutions(self._worker_id, batch)
        except asyncpg.UniqueViolationError:
            # Two claims raced to record the same Twilio SID; write one by one so only the
            # loser is refused.
            written: set[uuid.UUID] = set()
            for resolution in batch:
                try:
                    written |= await self._store.record_resolutions(self._worker_id, [resolution])
                except asyncpg.UniqueViolationError:
                    _log.error(
                        "outbox.twilio_sid_conflict",
                        extra={"fields": {"message_id": resolution.message_id}},
                    )
            return written


def _count(batch: Sequence[Resolution], written: set[uuid.UUID]) -> None:
    """The batch's metrics, each counter moved once per batch."""
    statuses: Tally[MessageStatus] = Tally()
    lost = 0
    for resolution in batch:
        if resolution.message_id not in written:
            lost += 1
            continue
        statuses[resolution.status] += 1
        if resolution.status is MessageStatus.DEAD and resolution.dead_reason is not None:
            DEAD_LETTERS.labels(resolution.dead_reason.value).inc()
        elif resolution.status is MessageStatus.BLOCKED:
            BLOCKED_OPTOUT.inc()
    for status, count in statuses.items():
        _RESOLVED[status].inc(count)
    if lost:
        LEASES_LOST.inc(lost)


def _log_dropped(resolution: Resolution, error: Exception) -> None:
    fields = {"message_id": resolution.message_id, "error": repr(error)}
    _log.error("outbox.result_dropped", extra={"fields": fields})
