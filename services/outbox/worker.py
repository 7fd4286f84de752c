"""Sender workers: claim due messages in batches, feed them through per-sender lanes (token
bucket, round-robin across tenants) to a bounded pool of sends, and write the results back in
batches. Safe with any number of processes: a row is held by one worker under a lease.

Wake-ups: LISTEN `outbox_due` (an enqueue NOTIFYs at commit), a timer at the earliest retry
this worker scheduled, and a poll every `poll_interval_s` (<= 1 s) in case a NOTIFY is missed.
Leases are renewed while a message is held; a lease this worker lost is never written over.
On stop: no more claims, claimed-but-unsent messages are released at once, in-flight sends
finish and their results are written.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import Gauge

from infra.events import wait_any
from infra.log import get_logger
from services.outbox.config import WorkerConfig
from services.outbox.delivery import LeaseLostError, MessageDelivery, utc_now
from services.outbox.domain import FairQueue, MessageStatus, TokenBucket
from services.outbox.records import ClaimedMessage, Resolution
from services.outbox.results import LEASES_LOST, ResultWriter
from services.outbox.store import DUE_CHANNEL, OutboxStore

IN_FLIGHT = Gauge("snapsell_outbox_sends_in_flight", "Messages being processed by this worker")

_log = get_logger(__name__)
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(slots=True)
class _Held:
    message: ClaimedMessage
    renewed_at: float
    started: bool = False
    lost: bool = False


@dataclass(slots=True)
class _Lane:
    """The messages of one sender waiting for a token and a send slot."""

    bucket: TokenBucket | None
    queue: FairQueue[str, ClaimedMessage] = field(default_factory=FairQueue)
    task: asyncio.Task[None] | None = None


class SenderWorker:
    def __init__(
        self,
        store: OutboxStore,
        delivery: MessageDelivery,
        config: WorkerConfig,
        worker_id: str,
    ) -> None:
        self._store = store
        self._delivery = delivery
        self._config = config
        self.worker_id = worker_id
        self._held: dict[uuid.UUID, _Held] = {}
        self._lanes: dict[str, _Lane] = {}
        self._pairs: Tally[tuple[str, str]] = Tally()
        self._queued = 0
        self._in_flight = 0
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._results = ResultWriter(
            store, worker_id, config.claim_batch, config.flush_interval_s, self._written
        )
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._want_room = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # Claimed and not yet started may reach one batch beyond the sends in flight, so a
        # batch is ready whenever slots free up.
        self._max_buffered = config.max_in_flight + config.claim_batch
        self._claim_threshold = max(1, min(config.claim_batch, self._max_buffered) // 4)
        self._pair_cap = max(1, int(config.rate_per_sender * 2)) if config.rate_per_sender else 0

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        helpers = [
            asyncio.create_task(self._listen(stop), name="outbox-listen"),
            asyncio.create_task(self._renew_leases(stop), name="outbox-leases"),
        ]
        flusher = asyncio.create_task(self._results.run(), name="outbox-results")
        try:
            await self._claim_loop(stop)
        finally:
            await self._shutdown(helpers, flusher)

    async def _shutdown(
        self, helpers: list[asyncio.Task[None]], flusher: asyncio.Task[None]
    ) -> None:
        for lane in list(self._lanes.values()):
            if lane.task is not None:
                lane.task.cancel()
        unsent = [h.message.id for h in self._held.values() if not h.started]
        for message_id in unsent:
            self._forget(message_id)
        try:
            await self._store.release(self.worker_id, unsent)
        except _DB_ERRORS as error:  # the leases will expire and the rows be reconciled
            _log.warning("outbox.release_failed", extra={"fields": {"error": str(error)}})
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._config.send_timeout_s + 5)
        self._results.finish()
        await asyncio.wait([flusher], timeout=30)
        for task in [*helpers, flusher]:
            task.cancel()
        await asyncio.gather(*helpers, flusher, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()

    # --- claiming ---------------------------------------------------------------------------

    @property
    def _buffered(self) -> int:
        return self._queued + self._in_flight

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            self._room.clear()
            free = self._max_buffered - self._buffered
            self._want_room = free < self._claim_threshold and self._buffered > 0
            if not self._want_room:
                limit = min(free, self._config.claim_batch)
                try:
                    claimed = await self._store.claim_due_messages(
                        self.worker_id, limit, self._config.lease_s, self._saturated_pairs()
                    )
                except _DB_ERRORS as error:
                    _log.warning("outbox.claim_failed", extra={"fields": {"error": str(error)}})
                    await wait_any(stop, timeout_s=self._config.poll_interval_s)
                    continue
                except Exception:  # a bug must not stop sending for good; it is logged
                    _log.exception("outbox.claim_crashed")
                    await wait_any(stop, timeout_s=self._config.poll_interval_s)
                    continue
                for message in claimed:
                    self._dispatch(message)
                if len(claimed) == limit:
                    self._want_room = True
                    if self._max_buffered - self._buffered >= self._claim_threshold:
                        continue  # more may be due and there is room for them
            await wait_any(self._wake, self._room, stop, timeout_s=self._config.poll_interval_s)

    def _saturated_pairs(self) -> list[tuple[str, str]]:
        if not self._pair_cap:
            return []
        return [pair for pair, count in self._pairs.items() if count >= self._pair_cap]

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def _listen(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with self._store.pool.acquire() as conn:
                    await conn.add_listener(DUE_CHANNEL, self._notified)
                    try:
                        self._wake.set()  # whatever was enqueued while we were not listening
                        while not stop.is_set() and not conn.is_closed():
                            await wait_any(stop, timeout_s=1.0)
                    finally:
                        if not conn.is_closed():
                            await conn.remove_listener(DUE_CHANNEL, self._notified)
            except _DB_ERRORS as error:
                _log.warning("outbox.listen_failed", extra={"fields": {"error": str(error)}})
                await wait_any(stop, timeout_s=1.0)

    def _wake_at(self, delay_s: float) -> None:
        """Claim again when this worker's earliest scheduled retry is due."""
        loop = asyncio.get_running_loop()
        at = loop.time() + max(0.0, delay_s)
        if self._timer is not None and self._timer_at > loop.time() and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._wake.set)

    # --- lanes and sends ---------------------------------------------------------------------

    def _dispatch(self, message: ClaimedMessage) -> None:
        self._held[message.id] = _Held(message, time.monotonic())
        lane = self._lanes.get(message.sender_key)
        if lane is None:
            bucket = None
            if self._config.rate_per_sender:
                bucket = TokenBucket(
                    self._config.rate_per_sender, self._config.rate_burst, time.monotonic()
                )
            lane = self._lanes[message.sender_key] = _Lane(bucket)
        lane.queue.push(message.tenant_id, message)
        self._pairs[(message.sender, message.tenant_id)] += 1
        self._queued += 1
        if lane.task is None:
            lane.task = asyncio.create_task(self._run_lane(message.sender_key, lane))

    async def _run_lane(self, key: str, lane: _Lane) -> None:
        try:
            while (message := lane.queue.pop()) is not None:
                self._queued -= 1
                self._unpair(message)
                held = self._held.get(message.id)
                if held is None or held.lost:
                    self._forget(message.id)
                    continue
                if lane.bucket is not None:
                    delay = lane.bucket.reserve(time.monotonic())
                    if delay > 0:
                        await asyncio.sleep(delay)
                await self._slots.acquire()
                held.started = True
                self._in_flight += 1
                IN_FLIGHT.inc()
                task = asyncio.create_task(self._process(held))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            lane.task = None
            if not lane.queue:
                self._lanes.pop(key, None)

    def _unpair(self, message: ClaimedMessage) -> None:
        pair = (message.sender, message.tenant_id)
        self._pairs[pair] -= 1
        if self._pairs[pair] <= 0:
            del self._pairs[pair]

    async def _process(self, held: _Held) -> None:
        message = held.message
        resolution: Resolution | None = None
        try:
            resolution = await self._delivery.resolve(message)
        except LeaseLostError:
            LEASES_LOST.inc()
        except Exception:
            # Whether a send happened is not known here: settle it like an unknown outcome.
            _log.exception("outbox.process_failed", extra={"fields": {"message_id": message.id}})
            resolution = Resolution(
                message.id,
                message.tenant_id,
                MessageStatus.PENDING,
                next_attempt_at=utc_now(),
                reconcile_since=message.reconcile_since or message.claimed_at,
            )
        finally:
            self._slots.release()
            self._in_flight -= 1
            IN_FLIGHT.dec()
            if self._want_room and self._max_buffered - self._buffered >= self._claim_threshold:
                self._room.set()
        if resolution is None:
            self._forget(message.id)
            return
        self._results.add(resolution)

    def _forget(self, message_id: uuid.UUID) -> None:
        self._held.pop(message_id, None)

    # --- results -----------------------------------------------------------------------------

    def _written(self, batch: Sequence[Resolution], written: set[uuid.UUID]) -> None:
        """After each batch: let go of the messages, and wake at the earliest retry."""
        earliest: float | None = None
        now = utc_now()
        for resolution in batch:
            self._forget(resolution.message_id)
            if resolution.message_id in written and resolution.next_attempt_at is not None:
                delay = (resolution.next_attempt_at - now).total_seconds()
                earliest = delay if earliest is None else min(earliest, delay)
        if earliest is not None:
            self._wake_at(earliest)

    # --- leases --------------------------------------------------------------------------------

    async def _renew_leases(self, stop: asyncio.Event) -> None:
        interval = self._config.lease_s / 4
        while not stop.is_set():
            await wait_any(stop, timeout_s=interval)
            now = time.monotonic()
            due = [
                i for i, h in self._held.items() if now - h.renewed_at >= interval and not h.lost
            ]
            if not due:
                continue
            try:
                kept = await self._store.renew_leases(self.worker_id, due, self._config.lease_s)
            except _DB_ERRORS as error:
                _log.warning("outbox.renew_failed", extra={"fields": {"error": str(error)}})
                continue
            for message_id in due:
                held = self._held.get(message_id)
                if held is None:
                    continue
                if message_id in kept:
                    held.renewed_at = now
                else:
                    held.lost = True
