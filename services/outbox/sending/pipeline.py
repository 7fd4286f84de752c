"""The sending pipeline: claim due messages in batches, check the batch's consent in one call, feed
the messages through per-sender lanes (token bucket, round-robin across tenants) to a bounded
pool of sends, and write the results back in batches. Safe with any number of processes: a
row is held by one process (a "worker" in the `lease_owner` column) under a lease.

Wake-ups: LISTEN `outbox_due` (an enqueue NOTIFYs at commit), a timer at the earliest retry
this worker scheduled, and a poll every `poll_interval_s` (<= 1 s) in case a NOTIFY is missed.
Leases are renewed (`leases.py`) and consent answers kept fresh (`consent.refresh_consent`)
while a message is held; a lease this worker lost is never written over.
On stop: no more claims, claimed-but-unsent messages are released at once, in-flight sends
finish and their results are written.

Direct dispatch (`reserve`, `OUTBOX_DIRECT_DISPATCH`): an enqueue in the same process asks,
right before its insert, for room for its messages due now; those granted a slot are inserted
already claimed by this worker and handed over after the commit (`DirectReservation.hand_over`),
the same path as a claimed batch, with no NOTIFY, wake-up or claim (messages handed over while
the consent check of earlier ones is under way are checked together once it ends). Nothing is
granted while the pipeline is stopping, to a (sender, tenant) pair it has enough of, beyond its
free room, or while due messages are known to wait in the table (its last claim came back
full, or an enqueue inserted due messages it had no room for since that claim started): those
are claimed as usual, so direct dispatch never overtakes a backlog. A reservation is always
settled (`hand_over` or `cancel`): the room it held is given back, whatever was inserted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter as Tally
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import Gauge

from infra.db import DATABASE_UNAVAILABLE
from infra.events import wait_any
from infra.log import get_logger
from services.outbox.config import WorkerConfig
from services.outbox.domain import ClaimedMessage, FairQueue, MessageStatus, Resolution, TokenBucket
from services.outbox.sending.consent import ConsentAnswer, refresh_consent
from services.outbox.sending.leases import Held, renew_leases
from services.outbox.sending.send import LeaseLostError, MessageDelivery, utc_now
from services.outbox.sending.wakeups import DueWakeups
from services.outbox.sending.writer import LEASES_LOST, ResultWriter
from services.outbox.store import OutboxStore

IN_FLIGHT = Gauge("snapsell_outbox_sends_in_flight", "Messages being processed by this worker")

_log = get_logger(__name__)
_DB_ERRORS: tuple[type[Exception], ...] = (*DATABASE_UNAVAILABLE, asyncpg.PostgresError)


@dataclass(slots=True)
class DirectReservation:
    """Room held in a pipeline for an enqueue's messages due now: `taken[i]` says whether the
    i-th message asked about may be inserted claimed by `worker_id` for `lease_s`."""

    pipeline: SendingPipeline
    worker_id: str
    lease_s: float
    taken: list[bool]
    pairs: list[tuple[str, str]]
    declined: bool
    settled: bool = False

    def hand_over(self, claimed: Sequence[ClaimedMessage]) -> bool:
        """After the insert committed: give the room back and send `claimed` (the messages
        inserted claimed). False when the pipeline stopped meanwhile: the caller releases
        them (their lease runs out otherwise)."""
        return self.pipeline._settle(self, claimed)

    def cancel(self) -> None:
        """The insert failed: give the room back."""
        self.pipeline._settle(self, None)


@dataclass(slots=True)
class _Lane:
    """The messages of one sender waiting for a token and a send slot."""

    bucket: TokenBucket | None
    queue: FairQueue[str, ClaimedMessage] = field(default_factory=FairQueue)
    task: asyncio.Task[None] | None = None


class SendingPipeline:
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
        self._held: dict[uuid.UUID, Held] = {}
        self._lanes: dict[str, _Lane] = {}
        self._pairs: Tally[tuple[str, str]] = Tally()
        self._queued = 0
        self._in_flight = 0
        # Claimed, waiting for their batch's consent answer.
        self._checking = 0
        self._checks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._results = ResultWriter(
            store, worker_id, config.claim_batch, config.flush_interval_s, self._written
        )
        self._wakeups = DueWakeups(store.pool)
        self._room = asyncio.Event()
        self._want_room = False
        # Claimed and not yet started may reach two batches beyond the sends in flight, and a
        # claim starts once half a batch is free: the next batch is claimed and checked while
        # the one before is sent, so a busy loop's slower round trips never leave slots idle.
        self._max_buffered = config.max_in_flight + 2 * config.claim_batch
        self._claim_threshold = max(1, config.claim_batch // 2)
        self._pair_cap = max(1, int(config.rate_per_sender * 2)) if config.rate_per_sender else 0
        # Direct dispatch: open while the claim loop runs; room reserved by enqueues whose
        # insert has not returned yet, and by the claim in progress.
        self._accepting = False
        self._stop: asyncio.Event | None = None
        self._reserved = 0
        self._reservations_settled = asyncio.Event()
        self._claiming = 0
        # Due messages may wait in the table: set by a full claim, or by an enqueue that
        # inserted due messages without room (after claim number `_declined_at` started);
        # cleared by a claim that started later and came back short. True until the first
        # claim, which finds what waited while this pipeline was not running.
        self._backlog = True
        self._claims_started = 0
        self._declined_at = 0
        # Handed over while the consent check of earlier handed-over messages is under way.
        self._handed_over: list[ClaimedMessage] = []
        self._checking_handed_over = False

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        config = self._config
        helpers = [
            asyncio.create_task(self._wakeups.listen(stop), name="outbox-listen"),
            asyncio.create_task(
                renew_leases(self._held, self._store, self.worker_id, config.lease_s, stop),
                name="outbox-leases",
            ),
        ]
        if config.consent_max_age_s > 0:  # 0: every send asks again anyway
            refresh = refresh_consent(
                self._held, self._delivery, config.consent_max_age_s, config.claim_batch, stop
            )
            helpers.append(asyncio.create_task(refresh, name="outbox-consent-refresh"))
        flusher = asyncio.create_task(self._results.run(), name="outbox-results")
        try:
            self._stop = stop
            self._accepting = self._config.direct_dispatch
            await self._claim_loop(stop)
        finally:
            self._accepting = False
            await self._shutdown(helpers, flusher)

    async def _shutdown(
        self, helpers: list[asyncio.Task[None]], flusher: asyncio.Task[None]
    ) -> None:
        if self._reserved:  # enqueues mid-insert: what they hand over is released below
            self._reservations_settled.clear()
            await wait_any(self._reservations_settled, timeout_s=self._config.send_timeout_s)
        for check in self._checks:
            check.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
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
        self._wakeups.close()

    # --- claiming ---------------------------------------------------------------------------

    @property
    def _buffered(self) -> int:
        return self._checking + self._queued + self._in_flight + self._reserved

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wakeups.event.clear()
            self._room.clear()
            free = self._max_buffered - self._buffered
            self._want_room = free < self._claim_threshold and self._buffered > 0
            if not self._want_room:
                limit = min(free, self._config.claim_batch)
                self._claims_started += 1
                started = self._claims_started
                self._claiming = limit
                try:
                    claimed = await self._store.claim_due_messages(
                        self.worker_id,
                        limit,
                        self._config.lease_s,
                        self._saturated_pairs(),
                        list(self._held),
                    )
                except _DB_ERRORS as error:
                    _log.warning("outbox.claim_failed", extra={"fields": {"error": str(error)}})
                    await wait_any(stop, timeout_s=self._config.poll_interval_s)
                    continue
                except Exception:  # a bug must not stop sending for good; it is logged
                    _log.exception("outbox.claim_crashed")
                    await wait_any(stop, timeout_s=self._config.poll_interval_s)
                    continue
                finally:
                    self._claiming = 0
                if claimed:
                    self._check_then_dispatch(claimed)
                if len(claimed) < limit and started > self._declined_at:
                    self._backlog = False
                if len(claimed) == limit:
                    self._backlog = True
                    self._want_room = True
                    if self._max_buffered - self._buffered >= self._claim_threshold:
                        continue  # more may be due and there is room for them
            await wait_any(
                self._wakeups.event, self._room, stop, timeout_s=self._config.poll_interval_s
            )

    def _saturated_pairs(self) -> list[tuple[str, str]]:
        if not self._pair_cap:
            return []
        return [pair for pair, count in self._pairs.items() if count >= self._pair_cap]

    # --- direct dispatch -----------------------------------------------------------------------

    def reserve(self, pairs: Sequence[tuple[str, str]]) -> DirectReservation:
        """Room for an enqueue's messages due now, one (sender, tenant) pair each, held until
        the reservation is settled; see the module's docstring for what is refused."""
        taken = [False] * len(pairs)
        reserved: list[tuple[str, str]] = []
        stopping = self._stop is None or self._stop.is_set()
        if self._accepting and not stopping and not self._backlog:
            free = self._max_buffered - self._buffered - self._claiming
            for i, pair in enumerate(pairs):
                if len(reserved) >= free:
                    break
                if self._pair_cap:
                    if self._pairs[pair] >= self._pair_cap:
                        continue
                    self._pairs[pair] += 1
                taken[i] = True
                reserved.append(pair)
            self._reserved += len(reserved)
        return DirectReservation(
            self,
            self.worker_id,
            self._config.lease_s,
            taken,
            reserved,
            declined=len(reserved) < len(pairs),
        )

    def _settle(
        self, reservation: DirectReservation, claimed: Sequence[ClaimedMessage] | None
    ) -> bool:
        if reservation.settled:
            raise RuntimeError("a direct dispatch reservation is settled once")
        reservation.settled = True
        self._reserved -= len(reservation.pairs)
        for sender, tenant_id in reservation.pairs:
            if self._pair_cap:
                self._unpair_key((sender, tenant_id))
        if not self._reserved:
            self._reservations_settled.set()
        if claimed is not None and reservation.declined:
            # Due messages inserted without room: claimed as usual, not overtaken.
            self._backlog = True
            self._declined_at = self._claims_started
        taken = bool(claimed) and self._accepting
        if taken:
            assert claimed is not None
            self._check_handed_over(list(claimed))
        self._offer_room()
        return taken or not claimed

    def _check_then_dispatch(self, claimed: list[ClaimedMessage]) -> None:
        """Hold the batch now (leases renewed, released on stop); send once consent is known."""
        self._hold(claimed)
        self._start_check(claimed)

    def _hold(self, claimed: list[ClaimedMessage]) -> None:
        now = time.monotonic()
        for message in claimed:
            self._held[message.id] = Held(message, now)
        if self._pair_cap:  # only a rate limit per sender needs the pairs counted
            for message in claimed:
                self._pairs[(message.sender, message.tenant_id)] += 1
        self._checking += len(claimed)

    def _start_check(self, claimed: list[ClaimedMessage]) -> asyncio.Task[None]:
        check = asyncio.create_task(self._check_consent(claimed))
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)
        return check

    def _check_handed_over(self, claimed: list[ClaimedMessage]) -> None:
        """`_check_then_dispatch` for messages handed over by enqueues: those handed over
        while the consent check of earlier ones is under way wait for it to end, then go in
        one check together. One enqueue after another is checked at once; many at a time
        share a CheckOptOuts call, as the messages of one claim do."""
        self._hold(claimed)
        self._handed_over.extend(claimed)
        if not self._checking_handed_over:
            self._check_next_handed_over()

    def _check_next_handed_over(self, _done: asyncio.Task[None] | None = None) -> None:
        self._checking_handed_over = False
        if not self._handed_over or not self._accepting:  # stopping: released as unsent
            return
        batch, self._handed_over = self._handed_over, []
        self._checking_handed_over = True
        self._start_check(batch).add_done_callback(self._check_next_handed_over)

    async def _check_consent(self, claimed: list[ClaimedMessage]) -> None:
        answers: Mapping[uuid.UUID, ConsentAnswer] = {}
        try:
            answers = await self._delivery.check_consent(claimed)
        except Exception:  # each message is then asked alone, right before its send
            _log.exception("outbox.consent_check_crashed")
        finally:
            self._checking -= len(claimed)
        for message in claimed:
            held = self._held.get(message.id)
            if held is None:
                self._unpair(message)
                continue
            held.consent = answers.get(message.id)
            self._dispatch(message)

    def _dispatch(self, message: ClaimedMessage) -> None:
        key = message.sender_key
        lane = self._lanes.get(key)
        if lane is None:
            bucket = None
            if self._config.rate_per_sender:
                bucket = TokenBucket(
                    self._config.rate_per_sender, self._config.rate_burst, time.monotonic()
                )
            lane = self._lanes[key] = _Lane(bucket)
        lane.queue.push(message.tenant_id, message)
        self._queued += 1
        if lane.task is None:
            lane.task = asyncio.create_task(self._run_lane(key, lane))

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
        if self._pair_cap:
            self._unpair_key((message.sender, message.tenant_id))

    def _unpair_key(self, pair: tuple[str, str]) -> None:
        self._pairs[pair] -= 1
        if self._pairs[pair] <= 0:
            del self._pairs[pair]

    def _offer_room(self) -> None:
        """Wake a claim loop waiting for room once half a batch is free."""
        if self._want_room and self._max_buffered - self._buffered >= self._claim_threshold:
            self._room.set()

    async def _process(self, held: Held) -> None:
        message = held.message
        resolution: Resolution | None = None
        try:
            resolution = await self._delivery.resolve(message, held.consent)
        except LeaseLostError:
            LEASES_LOST.inc()
        except Exception as error:
            # Whether a send happened is not known here: settle it like an unknown outcome.
            if isinstance(error, DATABASE_UNAVAILABLE):  # an outage, not a bug: no stack trace
                _log.warning(
                    "outbox.process_interrupted",
                    extra={"fields": {"message_id": message.id, "error": repr(error)}},
                )
            else:
                _log.exception(
                    "outbox.process_failed", extra={"fields": {"message_id": message.id}}
                )
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
            self._offer_room()
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
            self._wakeups.at(earliest)  # claim again when this worker's earliest retry is due
