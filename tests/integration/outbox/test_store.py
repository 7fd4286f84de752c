"""The sender side's SQL on the session's real PostgreSQL: idempotent enqueue with its NOTIFY,
claims under a lease that never overlap, expired leases claimed again for reconciliation,
batched results that respect who holds the lease, and fairness between tenants."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from infra.db import create_pool, migrate_service
from services.outbox.domain import (
    AttemptOutcome,
    AttemptRecord,
    Channel,
    MessageKind,
    MessageStatus,
    NewMessage,
    PendingEvent,
    Resolution,
)
from services.outbox.store import DUE_CHANNEL, OutboxStore
from tools.stack import reset_service_schema

MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "outbox" / "migrations"
ACCOUNT = "AC" + "7" * 32


def new(
    i: int, *, tenant: str = "shop-a", sender: str = "+14155550100", **changes: object
) -> NewMessage:
    fields: dict[str, object] = {
        "tenant_id": tenant,
        "idempotency_key": f"key-{tenant}-{i}",
        "correlation_id": "",
        "kind": MessageKind.CONVERSATIONAL,
        "account_sid": ACCOUNT,
        "sender": sender,
        "recipient_channel": Channel.SMS,
        "recipient": f"+3361{i:07d}",
        "body": f"message {i}",
        "content_sid": None,
        "content_variables": None,
        "not_before": None,
        "max_attempts": 5,
    }
    fields.update(changes)
    return NewMessage(**fields)  # type: ignore[arg-type]


async def test_enqueue_twice_with_one_key_stores_one_message_and_notifies_once(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    notified: list[str] = []

    def on_notify(*args: object) -> None:
        notified.append(str(args[2]))

    async with pool.acquire() as listener:
        await listener.add_listener(DUE_CHANNEL, on_notify)
        try:
            first = await store.enqueue(new(1))
            again = await store.enqueue(new(1, body="a different body"))
            await asyncio.sleep(0.2)
        finally:
            await listener.remove_listener(DUE_CHANNEL, on_notify)
    assert first[1] is True and again == (first[0], False)
    assert await pool.fetchval("SELECT count(*) FROM messages") == 1
    assert await pool.fetchval("SELECT body FROM messages") == "message 1"
    assert notified == [DUE_CHANNEL]


async def test_enqueue_many_stores_each_key_once_and_answers_in_the_order_asked(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    existing, _ = await store.enqueue(new(2))
    later = datetime.now(UTC) + timedelta(hours=1)
    batch = [
        new(3),
        new(2),
        new(1, tenant="shop-b"),
        new(3, body="again"),
        new(4, not_before=later),
    ]
    answers = await store.enqueue_many(batch)
    ids = [message_id for message_id, _ in answers]
    assert [created for _, created in answers] == [True, False, True, False, True]
    assert ids[1] == existing and ids[3] == ids[0] and len(set(ids)) == 4
    assert await pool.fetchval("SELECT count(*) FROM messages") == 4
    assert await pool.fetchval("SELECT body FROM messages WHERE id = $1", ids[0]) == "message 3"
    assert await store.enqueue_many([]) == []


async def test_a_message_scheduled_for_later_is_not_claimed_before_its_time(
    store: OutboxStore,
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    await store.enqueue(new(1, not_before=later))
    assert await store.claim_due_messages("w1", 10, 30) == []


async def test_concurrent_claims_never_share_a_message(store: OutboxStore) -> None:
    for i in range(300):
        await store.enqueue(new(i))
    claims = await asyncio.gather(*(store.claim_due_messages(f"w{n}", 40, 30) for n in range(8)))
    ids = [m.id for claim in claims for m in claim]
    assert len(ids) == len(set(ids)) == 300


async def test_an_expired_lease_is_claimed_again_as_an_unknown_outcome(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    await store.enqueue(new(1))
    [first] = await store.claim_due_messages("dead-worker", 10, 30)
    assert not first.lease_expired and first.reconcile_since is None
    assert await store.claim_due_messages("w2", 10, 30) == []  # leased
    await pool.execute("UPDATE messages SET next_attempt_at = now() - interval '1 second'")
    [again] = await store.claim_due_messages("w2", 10, 30)
    assert again.id == first.id and again.lease_expired
    assert again.reconcile_since == first.claimed_at
    assert again.attempt_count == 1
    row = await pool.fetchrow("SELECT outcome, worker_id FROM attempts")
    assert dict(row) == {"outcome": "lease_expired", "worker_id": "dead-worker"}


async def test_a_worker_never_claims_again_a_message_it_still_holds(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    """Its result for the first claim, written late (the database was away), would otherwise
    land on the second claim as if it were that one's."""
    await store.enqueue(new(1))
    [first] = await store.claim_due_messages("w1", 10, 30)
    await pool.execute("UPDATE messages SET next_attempt_at = now() - interval '1 second'")
    assert await store.claim_due_messages("w1", 10, 30, held=[first.id]) == []
    [again] = await store.claim_due_messages("w2", 10, 30)  # another worker takes it over
    assert again.id == first.id and again.lease_expired


def _sent(message_id: uuid.UUID, sid: str) -> Resolution:
    now = datetime.now(UTC)
    return Resolution(
        message_id,
        "shop-a",
        MessageStatus.SENT,
        (AttemptRecord(AttemptOutcome.ACCEPTED, now, now, 201, twilio_sid=sid),),
        attempt_increment=1,
        twilio_sid=sid,
        twilio_status="queued",
        sent_at=now,
        events=(PendingEvent("outbox.v1.message.sent", b"payload"),),
    )


def _retry(message_id: uuid.UUID) -> Resolution:
    return Resolution(
        message_id,
        "shop-a",
        MessageStatus.PENDING,
        attempt_increment=1,
        next_attempt_at=datetime.now(UTC) + timedelta(seconds=5),
        error_code=20500,
        error_message="Internal Server Error",
    )


async def test_results_are_written_in_one_batch_with_attempts_and_events(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    for i in range(3):
        await store.enqueue(new(i))
    claimed = await store.claim_due_messages("w1", 10, 30)
    written = await store.record_resolutions(
        "w1", [_sent(claimed[0].id, "SM1"), _sent(claimed[1].id, "SM2"), _retry(claimed[2].id)]
    )
    assert written == {m.id for m in claimed}
    statuses = dict(await pool.fetch("SELECT twilio_sid, status FROM messages"))
    assert statuses == {"SM1": "sent", "SM2": "sent", None: "pending"}
    assert await pool.fetchval("SELECT count(*) FROM attempts") == 2
    assert await pool.fetchval("SELECT count(*) FROM events WHERE published_at IS NULL") == 2


async def test_a_worker_that_lost_its_lease_cannot_overwrite_the_new_holder(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    await store.enqueue(new(1))
    await store.enqueue(new(2))
    first, second = await store.claim_due_messages("slow-worker", 10, 30)
    await pool.execute("UPDATE messages SET next_attempt_at = now() - interval '1 second'")
    assert len(await store.claim_due_messages("w2", 10, 30)) == 2
    # A retry decision from the old holder is refused ...
    assert await store.record_resolutions("slow-worker", [_retry(first.id)]) == set()
    # ... but Twilio's acceptance is a fact and is kept, once, whoever learned it.
    assert await store.record_resolutions("slow-worker", [_sent(second.id, "SM9")]) == {second.id}
    assert await store.record_resolutions("w2", [_sent(second.id, "SM10")]) == set()
    rows = dict(await pool.fetch("SELECT id, coalesce(twilio_sid, status) FROM messages"))
    assert rows == {first.id: "sending", second.id: "SM9"}


async def test_a_twilio_sid_is_never_recorded_for_two_messages(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    await store.enqueue(new(1))
    await store.enqueue(new(2))
    first, second = await store.claim_due_messages("w1", 10, 30)
    written = await store.record_resolutions("w1", [_sent(first.id, "SM1")])
    assert written == {first.id}
    assert await store.record_resolutions("w1", [_sent(second.id, "SM1")]) == set()


async def test_renewed_leases_hold_and_released_messages_are_due_at_once(
    store: OutboxStore,
) -> None:
    await store.enqueue(new(1))
    [message] = await store.claim_due_messages("w1", 10, 30)
    assert await store.renew_leases("w1", [message.id], 30) == {message.id}
    assert await store.renew_leases("intruder", [message.id], 30) == set()
    await store.release("w1", [message.id])
    [again] = await store.claim_due_messages("w2", 10, 30)
    assert again.id == message.id and not again.lease_expired


async def test_a_saturated_tenant_does_not_hold_back_another_tenants_messages(
    store: OutboxStore,
) -> None:
    shared = "MG" + "1" * 32
    for i in range(50):
        await store.enqueue(new(i, tenant="burst", sender=shared))
    await store.enqueue(new(99, tenant="quiet", sender=shared))
    claimed = await store.claim_due_messages("w1", 5, 30, saturated=[(shared, "burst")])
    assert [m.tenant_id for m in claimed] == ["quiet"]


async def test_the_backlog_is_counted_per_waiting_status(store: OutboxStore) -> None:
    for i in range(3):
        await store.enqueue(new(i))
    await store.claim_due_messages("w1", 1, 30)
    assert await store.backlog_counts() == {"pending": 2, "sending": 1, "dead": 0}


async def test_the_migrate_command_provisions_the_schema_and_exits(admin_dsn: str) -> None:
    await reset_service_schema(admin_dsn, "outbox")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.outbox",
        "migrate",
        cwd=MIGRATIONS.parents[2],
        env={**os.environ, "DATABASE_URL": admin_dsn, "LOG_LEVEL": "WARNING"},
    )
    assert await asyncio.wait_for(process.wait(), 60) == 0
    conn = await asyncpg.connect(admin_dsn)
    try:
        tables = {
            row["tablename"]
            for row in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'outbox'"
            )
        }
    finally:
        await conn.close()
    assert {"messages", "attempts", "events", "schema_migrations"} <= tables


async def _seq_scans(pool: asyncpg.Pool, worker: asyncpg.Pool) -> int:
    """Sequential scans of `messages` so far, the `worker` connection's included."""
    await worker.execute("SELECT pg_stat_force_next_flush()")
    await worker.execute("SELECT 1")  # the forced flush happens at the end of a statement
    await pool.execute("SELECT pg_stat_clear_snapshot()")
    count = await pool.fetchval(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'messages'::regclass"
    )
    assert isinstance(count, int)
    return count


async def test_claims_and_results_find_rows_by_key_with_plans_made_on_an_empty_table(
    pool: asyncpg.Pool,
) -> None:
    """A plan made while `messages` was small is kept by the plan caches until the next
    ANALYZE; it must still look the claimed rows up by key once thousands wait, not scan
    every message at each claim and each batch of results."""
    await pool.execute("TRUNCATE messages, attempts, events")
    await pool.execute("ALTER TABLE messages SET (autovacuum_enabled = false)")
    await pool.execute("ANALYZE messages")
    dsn = await migrate_service("outbox", MIGRATIONS)
    worker = await create_pool(dsn, "outbox", min_size=1, max_size=1)
    try:
        # The plans are made now, on an empty table, and kept.
        await worker.execute("SET plan_cache_mode = force_generic_plan")
        store = OutboxStore(worker)
        await store.enqueue(new(0))
        for _ in range(3):
            claimed = await store.claim_due_messages("w1", 10, 30)
            await store.renew_leases("w1", [m.id for m in claimed], 30)
            await store.record_resolutions("w1", [_retry(m.id) for m in claimed])
            await pool.execute("UPDATE messages SET next_attempt_at = now()")
        await store.enqueue_many([new(i) for i in range(1, 3001)])
        before = await _seq_scans(pool, worker)
        for batch in range(5):
            claimed = await store.claim_due_messages("w1", 20, 30)
            assert len(claimed) == 20
            assert await store.renew_leases("w1", [m.id for m in claimed], 30) == {
                m.id for m in claimed
            }
            sids = [f"SM{batch}-{n}" for n in range(len(claimed))]
            written = await store.record_resolutions(
                "w1", [_sent(m.id, sid) for m, sid in zip(claimed, sids, strict=True)]
            )
            assert written == {m.id for m in claimed}
        assert await _seq_scans(pool, worker) == before
    finally:
        await worker.close()
        await pool.execute("ALTER TABLE messages RESET (autovacuum_enabled)")


async def test_an_enqueue_may_insert_a_message_claimed_as_a_claim_would_leave_it(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    stored, [taken] = await store.enqueue_and_claim(
        [new(1), new(2), new(3, not_before=later)], [True, False, True], "w1", 30
    )
    [(taken_id, _), (pending_id, _), (scheduled_id, _)] = stored
    [claimed] = await store.claim_due_messages("w1", 10, 30)
    assert claimed.id == pending_id and taken.id == taken_id
    # The same message as a claim gives, but for what differs between two messages.
    assert replace(taken, id=claimed.id, recipient=claimed.recipient, body=claimed.body) == replace(
        claimed,
        claimed_at=taken.claimed_at,
        budget_started_at=taken.budget_started_at,
    )
    rows = await pool.fetch(
        "SELECT id, status, lease_owner, next_attempt_at = lease_expires_at AS due_at_expiry,"
        " lease_expires_at - attempt_started_at AS lease, attempt_count, reconcile_since"
        " FROM messages WHERE id = ANY ($1::uuid[])",
        [taken_id, pending_id],
    )
    assert [dict(row) | {"id": None} for row in rows] == [
        {
            "id": None,
            "status": "sending",
            "lease_owner": "w1",
            "due_at_expiry": True,
            "lease": timedelta(seconds=30),
            "attempt_count": 0,
            "reconcile_since": None,
        }
    ] * 2
    # Taken only when due now: a message scheduled for later is claimed at its time.
    scheduled = await pool.fetchrow(
        "SELECT status, lease_owner, next_attempt_at FROM messages WHERE id = $1", scheduled_id
    )
    assert tuple(scheduled or ()) == ("pending", None, later)


async def test_a_message_scheduled_for_later_starts_its_retry_budget_at_its_time(
    store: OutboxStore, pool: asyncpg.Pool
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    await store.enqueue(new(1, not_before=later))
    await store.enqueue_many([new(2, not_before=later), new(3)])
    budgets = await pool.fetch("SELECT budget_started_at FROM messages ORDER BY idempotency_key")
    assert [row["budget_started_at"] == later for row in budgets] == [True, True, False]
