"""Direct dispatch on the session's real PostgreSQL: an enqueue in the process of a running
sending pipeline inserts what the pipeline has room for already claimed and hands it over (no
NOTIFY, no claim); everything else goes through the table as before. The pipeline and the
enqueue run in this process, with a stand-in for Twilio that counts its sends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.outbox.config import WorkerConfig
from services.outbox.domain import (
    AttemptOutcome,
    AttemptRecord,
    ClaimedMessage,
    MessageStatus,
    Resolution,
)
from services.outbox.enqueue import enqueue_messages
from services.outbox.sending.consent import ConsentAnswer
from services.outbox.sending.pipeline import SendingPipeline
from services.outbox.sending.send import utc_now
from services.outbox.store import DUE_CHANNEL, OutboxStore
from tests.integration.outbox.test_store import new
from tests.support.polling import eventually
from tests.unit.outbox.test_send import CONFIG

MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "outbox" / "migrations"
# Nothing but direct dispatch wakes these pipelines once their first claim is done: no LISTEN
# (see `running`) and a poll once an hour.
QUIET = replace(CONFIG, poll_interval_s=3600, flush_interval_s=0, lease_s=30)


class _Twilio:
    """Accepts every send once `open` is set; remembers which messages it sent."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.sent: list[uuid.UUID] = []

    async def check_consent(
        self, messages: Sequence[ClaimedMessage]
    ) -> dict[uuid.UUID, ConsentAnswer]:
        return {}

    async def resolve(self, message: ClaimedMessage, consent: ConsentAnswer | None) -> Resolution:
        await self.open.wait()
        self.sent.append(message.id)
        now = utc_now()
        sid = f"SM{message.id.hex}"
        return Resolution(
            message.id,
            message.tenant_id,
            MessageStatus.SENT,
            attempts=(AttemptRecord(AttemptOutcome.ACCEPTED, message.claimed_at, now, 201),),
            attempt_increment=1,
            twilio_sid=sid,
            twilio_status="queued",
            sent_at=now,
        )


@asynccontextmanager
async def running(
    store: OutboxStore, twilio: _Twilio, config: WorkerConfig = QUIET, *, listen: bool = False
) -> AsyncIterator[tuple[SendingPipeline, asyncio.Event]]:
    """A pipeline running in this process, once its first claim found the table empty; without
    `listen` it never hears a NOTIFY."""
    pipeline = SendingPipeline(store, twilio, config, "this-process")  # type: ignore[arg-type]  # the stand-in
    if not listen:

        async def deaf(stop: asyncio.Event) -> None:
            pipeline._wakeups.event.set()
            await stop.wait()

        pipeline._wakeups.listen = deaf  # type: ignore[method-assign]  # no LISTEN at all
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    try:
        await eventually(lambda: not pipeline._backlog, "the first claim")
        yield pipeline, stop
    finally:
        stop.set()
        twilio.open.set()
        await asyncio.wait_for(task, timeout=30)


async def row(pool: asyncpg.Pool, message_id: uuid.UUID) -> asyncpg.Record:
    found = await pool.fetchrow(
        "SELECT status, lease_owner, attempt_started_at = created_at AS inserted_claimed,"
        " attempt_started_at, next_attempt_at FROM messages WHERE id = $1",
        message_id,
    )
    assert found is not None
    return found


@asynccontextmanager
async def notifications(pool: asyncpg.Pool) -> AsyncIterator[list[str]]:
    """The `outbox_due` NOTIFYs committed inside the block, up to the end of it: a marker is
    sent last and waited for (a connection receives notifications in commit order)."""
    received: list[str] = []
    marker = asyncio.Event()

    def on_notify(*args: object) -> None:
        if args[3] == "end-of-block":
            marker.set()
        else:
            received.append(str(args[3]))

    async with pool.acquire() as listener:
        await listener.add_listener(DUE_CHANNEL, on_notify)
        try:
            yield received
            await pool.execute(f"SELECT pg_notify('{DUE_CHANNEL}', 'end-of-block')")
            await asyncio.wait_for(marker.wait(), timeout=5)
        finally:
            await listener.remove_listener(DUE_CHANNEL, on_notify)


async def test_an_enqueue_with_room_is_sent_without_a_notify_or_a_claim(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    twilio = _Twilio()
    async with running(store, twilio) as (pipeline, _), notifications(pool) as notified:
        [(message_id, created)] = await enqueue_messages(
            store, [new(1)], pipeline, datetime.now(UTC)
        )
        # Neither a NOTIFY (nobody listens) nor a poll (hourly) could have woken the pipeline.
        await eventually(lambda: twilio.sent == [message_id], "sent", timeout_s=5)
        await eventually(lambda: pipeline._held == {}, "result written", timeout_s=5)
    assert created is True
    assert notified == []
    stored = await row(pool, message_id)
    assert stored["status"] == "sent"
    # Its claim is its insert: the same transaction's now(), never a second claim statement.
    assert stored["inserted_claimed"] is True


async def test_a_failed_insert_gives_its_room_back(store: OutboxStore, pool: asyncpg.Pool) -> None:
    twilio = _Twilio()
    async with running(store, twilio, replace(QUIET, max_in_flight=1, claim_batch=1)) as (
        pipeline,
        _,
    ):
        invalid = new(1, body=None)  # neither a body nor a template: the CHECK refuses it
        with pytest.raises(asyncpg.CheckViolationError):
            await enqueue_messages(store, [invalid] * 3, pipeline, datetime.now(UTC))
        # All the room (1 in flight + 2 claims) is free again for the next enqueue.
        stored = await enqueue_messages(store, [new(i) for i in range(3)], pipeline, utc_now())
        await eventually(lambda: len(twilio.sent) == 3, "all three sent", timeout_s=5)
    assert [twilio.sent.count(message_id) for message_id, _ in stored] == [1, 1, 1]
    for message_id, _ in stored:
        assert (await row(pool, message_id))["inserted_claimed"] is True


async def test_no_room_a_later_time_or_a_duplicate_goes_through_the_table(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    twilio = _Twilio()
    twilio.open.clear()  # sends wait, so what was taken keeps its room
    later = datetime.now(UTC) + timedelta(hours=1)
    # Room for 3: 1 send in flight and 2 claimed or taken waiting.
    config = replace(QUIET, max_in_flight=1, claim_batch=1, poll_interval_s=1)
    async with running(store, twilio, config, listen=True) as (pipeline, _):
        [(first, _)] = await enqueue_messages(store, [new(1)], pipeline, utc_now())
        await eventually(lambda: pipeline._in_flight == 1, "the first send started")
        async with notifications(pool) as notified:
            stored = await enqueue_messages(
                store,
                [new(1), new(2), new(3), new(4), new(5, not_before=later)],
                pipeline,
                utc_now(),
            )
        duplicate, taken, no_room, still_no_room, scheduled = (i for i, _ in stored)
        assert duplicate == first and [c for _, c in stored] == [False, True, True, True, True]
        assert pipeline._reserved == 0  # the duplicate's slot was given back
        assert (await row(pool, first))["inserted_claimed"] is True
        assert (await row(pool, taken))["inserted_claimed"] is True
        for message_id in (no_room, still_no_room):
            assert (await row(pool, message_id))["status"] == "pending"
        assert (await row(pool, scheduled))["next_attempt_at"] == later
        # The messages left pending and due woke the workers, once for the statement.
        assert notified == [""]
        twilio.open.set()
        await eventually(lambda: len(twilio.sent) == 4, "the due ones sent", timeout_s=10)
        for message_id in (no_room, still_no_room):
            claimed_later = await row(pool, message_id)
            assert claimed_later["status"] == "sent"
            assert claimed_later["inserted_claimed"] is False
    assert twilio.sent[:2] == [first, taken]
    assert sorted(map(str, twilio.sent[2:])) == sorted(map(str, (no_room, still_no_room)))
    assert (await row(pool, scheduled))["status"] == "pending"


async def test_a_stopping_pipeline_takes_nothing(store: OutboxStore, pool: asyncpg.Pool) -> None:
    twilio = _Twilio()
    twilio.open.clear()
    async with running(store, twilio) as (pipeline, stop):
        [(in_flight, _)] = await enqueue_messages(store, [new(1)], pipeline, utc_now())
        await eventually(lambda: pipeline._in_flight == 1, "the send started")
        stop.set()  # it now waits for its send in flight before it stops
        await asyncio.sleep(0.1)
        [(after_stop, _)] = await enqueue_messages(store, [new(2)], pipeline, utc_now())
        twilio.open.set()
    assert twilio.sent == [in_flight]
    assert (await row(pool, in_flight))["inserted_claimed"] is True
    left = await row(pool, after_stop)
    assert left["status"] == "pending" and left["attempt_started_at"] is None


async def test_messages_handed_over_as_the_pipeline_stops_are_released(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    twilio = _Twilio()

    class _StopsDuringInsert(OutboxStore):
        async def enqueue_and_claim(self, *args: Any, **kwargs: Any) -> Any:
            result = await super().enqueue_and_claim(*args, **kwargs)
            stop.set()
            await asyncio.sleep(0.2)  # the pipeline closes meanwhile
            return result

    async with running(store, twilio) as (pipeline, stop):
        stored = await enqueue_messages(
            _StopsDuringInsert(pool), [new(1)], pipeline, datetime.now(UTC)
        )
    [(message_id, _)] = stored
    assert twilio.sent == []
    released = await row(pool, message_id)
    # Taken, then due again at once for any worker rather than after its lease.
    assert released["inserted_claimed"] is True
    assert released["status"] == "pending" and released["lease_owner"] is None


async def test_an_enqueue_whose_caller_is_gone_mid_insert_still_hands_its_message_over(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    twilio = _Twilio()
    inserted = asyncio.Event()

    class _SlowToAnswer(OutboxStore):
        async def enqueue_and_claim(self, *args: Any, **kwargs: Any) -> Any:
            result = await super().enqueue_and_claim(*args, **kwargs)
            inserted.set()
            await asyncio.sleep(0.2)  # the answer is on its way when the caller goes
            return result

    async with running(store, twilio) as (pipeline, _):
        call = asyncio.create_task(
            enqueue_messages(_SlowToAnswer(pool), [new(1)], pipeline, datetime.now(UTC))
        )
        await inserted.wait()
        call.cancel()  # e.g. the client's deadline passed
        with pytest.raises(asyncio.CancelledError):
            await call
        # Sent now, not once its lease (30 s) has run out.
        await eventually(lambda: len(twilio.sent) == 1, "sent", timeout_s=5)
        assert pipeline._reserved == 0
    [message_id] = twilio.sent
    assert (await row(pool, message_id))["inserted_claimed"] is True
