"""outbox's data hygiene on a real PostgreSQL: only known event subjects are stored, the hot
queries run on indexes at a realistic size, and finished messages (with their attempts) and
published events are purged past their retention; messages still in hand never are."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from infra.db import create_pool, migrate_service
from infra.retention import RetentionSettings, RetentionTask
from services.outbox import events, store
from services.outbox.domain import (
    AttemptOutcome,
    AttemptRecord,
    MessageStatus,
    PendingEvent,
    Resolution,
)
from tests.integration.data_hygiene import (
    assert_subject_accepted,
    assert_uses_index,
    explain,
    insert_event,
    known_subjects,
    plan_nodes,
    process_with_fast_retention,
    recorded_subjects,
    wait_until_zero,
)
from tools.dev_keys import DevKeys
from tools.stack import reset_service_schema

SERVICE = "outbox"
MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "outbox" / "migrations"
MESSAGES = 50_000
TENANTS = 1_000
BIG_TABLES = ("messages", "attempts")
JOINS = ("Nested Loop", "Hash Join", "Merge Join")
NOW = datetime.now(UTC)
ACCOUNT_SID = "AC" + "a1" * 16


def sid(n: int) -> str:
    """The Twilio SID the fixture gave message `n`."""
    return f"SM{n:032x}"


# Message 31,337 of the fixture was delivered (it has a Twilio SID and attempts).
DELIVERED_SID = sid(31_337)


def phone(n: int) -> str:
    return f"+336{n % 20_000:08d}"


@pytest.fixture(scope="module")
async def pool(admin_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    await reset_service_schema(admin_dsn, SERVICE)
    pool = await create_pool(await migrate_service(SERVICE, MIGRATIONS), SERVICE, max_size=10)
    yield pool
    await pool.close()


async def test_events_table_rejects_an_unknown_subject(pool: asyncpg.Pool) -> None:
    assert await known_subjects(pool)
    with pytest.raises(asyncpg.CheckViolationError) as raised:
        await insert_event(pool, "outbox.v1.message.vanished")
    assert raised.value.constraint_name == "events_subject_known"


async def test_every_subject_the_code_records_is_allowed(pool: asyncpg.Pool) -> None:
    subjects = recorded_subjects(SERVICE)
    assert {events.SENT_SUBJECT, events.RECIPIENT_UNSUBSCRIBED_SUBJECT} <= subjects
    assert subjects <= await known_subjects(pool)
    for subject in sorted(subjects):
        await assert_subject_accepted(pool, subject)


# Message n's state: most are finished, a few dead (concentrated in one big shop), a backlog
# of pending ones (mostly scheduled later) and a few in flight.
_STATUS = """
CASE WHEN n % 100 = 0 THEN 'dead'
     WHEN n % 100 = 1 THEN 'pending'
     WHEN n % 250 = 2 THEN 'sending'
     ELSE (ARRAY['sent', 'delivered', 'read', 'failed', 'undelivered', 'blocked',
                 'delivered', 'read'])[n % 8 + 1]
END
"""


@pytest.fixture(scope="module")
async def loaded(pool: asyncpg.Pool) -> asyncpg.Pool:
    """50k messages over 31 days from 1k shops to 20k people, with ~1.2 attempts each."""
    await pool.execute("TRUNCATE messages, attempts, events")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            f"""
            INSERT INTO messages (id, tenant_id, idempotency_key, kind, account_sid, sender,
                recipient_channel, recipient, body, status, attempt_count, max_attempts,
                next_attempt_at, lease_owner, lease_expires_at, twilio_sid, twilio_status,
                dead_reason, created_at, updated_at, sent_at, dead_at)
            SELECT gen_random_uuid(),
                   CASE WHEN status = 'dead' AND n % 300 = 0 THEN 'shop-big'
                        ELSE 'shop-' || (n % $2) END,
                   'reply:' || md5(n::text), 'conversational', $4, 'whatsapp:+14155238886',
                   'whatsapp', '+336' || lpad((n % 20000)::text, 8, '0'), 'Merci !', status, 1,
                   5,
                   CASE WHEN status = 'pending' AND n % 1000 <> 1
                             THEN $3::timestamptz + interval '1 hour'
                        WHEN status = 'sending' THEN $3::timestamptz + interval '1 minute'
                        ELSE at END,
                   CASE WHEN status = 'sending' THEN 'worker-1' END,
                   CASE WHEN status = 'sending' THEN $3::timestamptz + interval '1 minute' END,
                   CASE WHEN status NOT IN ('pending', 'sending', 'dead', 'blocked')
                        THEN 'SM' || lpad(to_hex(n), 32, '0') END,
                   CASE WHEN status NOT IN ('pending', 'sending', 'dead', 'blocked')
                        THEN status END,
                   CASE WHEN status = 'dead' THEN 'permanent_error' END,
                   at, at + interval '3 seconds',
                   CASE WHEN status NOT IN ('pending', 'sending', 'dead', 'blocked')
                        THEN at + interval '1 second' END,
                   CASE WHEN status = 'dead' THEN at + interval '3 seconds' END
            FROM generate_series(1, $1) n,
                 LATERAL (SELECT {_STATUS} AS status,
                          $3::timestamptz - ($1 - n) * interval '54 seconds' AS at) m
            """,
            MESSAGES,
            TENANTS,
            NOW,
            ACCOUNT_SID,
        )
        await conn.execute(
            """
            INSERT INTO attempts (message_id, outcome, started_at, finished_at, twilio_sid,
                                  worker_id)
            SELECT id, 'accepted', created_at, created_at + interval '1 second', twilio_sid,
                   'worker-1'
            FROM messages WHERE twilio_sid IS NOT NULL
            UNION ALL
            SELECT id, 'retryable_error', created_at, created_at, NULL, 'worker-1'
            FROM messages WHERE status IN ('dead', 'failed')
            """
        )
    await pool.execute("ANALYZE messages, attempts")
    return pool


async def sending_ids(pool: asyncpg.Pool, limit: int) -> list[uuid.UUID]:
    rows = await pool.fetch("SELECT id FROM messages WHERE status = 'sending' LIMIT $1", limit)
    return [row["id"] for row in rows]


async def function_body(conn: asyncpg.Connection, name: str = "claim_due_messages") -> str:
    """A statement as PostgreSQL runs it (the store calls its function): the function's body,
    with the function's planner settings applied to the current transaction."""
    row = await conn.fetchrow(
        "SELECT prosrc, proconfig FROM pg_proc"
        " WHERE proname = $1 AND pronamespace = current_schema()::regnamespace",
        name,
    )
    assert row is not None and row["proconfig"], f"{name} runs under its planner settings"
    for setting in row["proconfig"]:
        name, value = setting.split("=", 1)
        await conn.execute("SELECT set_config($1, $2, true)", name, value)
    body: str = row["prosrc"]
    return body


@pytest.mark.parametrize("saturated", [[], ["whatsapp:+14155238886 shop-42"]])
async def test_claim_picks_due_messages_on_the_due_index(
    loaded: asyncpg.Pool, saturated: list[str]
) -> None:
    held = await sending_ids(loaded, 200)  # what a busy worker holds and must not claim again
    async with loaded.acquire() as conn, conn.transaction():
        body = await function_body(conn)
        plan = await explain(conn, body, "worker-2", 200, 60.0, saturated, held)
    assert_uses_index(plan, "messages_due_idx", big_tables=BIG_TABLES)
    assert_uses_index(plan, "messages_pkey", big_tables=BIG_TABLES)


async def test_claim_pairs_due_rows_by_hashing_even_when_few_look_due(
    loaded: asyncpg.Pool,
) -> None:
    """Statistics taken when nothing was waiting (the last backlog all sent, before a burst of
    enqueues) and the generic plan PostgreSQL keeps after a few runs: the planner expects a
    row or two from `due`, and must still not pair due and locked rows by comparing every
    pair (40,000 comparisons for a batch of 200)."""
    async with loaded.acquire() as conn:
        transaction = conn.transaction()  # rolled back: the fixture's rows stay as they are
        await transaction.start()
        try:
            body = await function_body(conn)
            await conn.execute(
                "PREPARE claim_plan_check (text, integer, double precision, text[], uuid[])"
                f" AS {body}"
            )
            await conn.execute(
                "UPDATE messages SET status = 'blocked', lease_owner = NULL,"
                " lease_expires_at = NULL WHERE status IN ('pending', 'sending')"
            )
            await conn.execute("ANALYZE messages")
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            raw = await conn.fetchval(
                "EXPLAIN (FORMAT JSON) EXECUTE claim_plan_check('worker-2', 200, 60.0, '{}', '{}')"
            )
        finally:
            await transaction.rollback()
    plan = json.loads(raw)[0]["Plan"]
    joins = [node["Node Type"] for node in plan_nodes(plan) if node["Node Type"] in JOINS]
    assert joins == ["Hash Join"], json.dumps(plan, indent=1)


async def test_lease_renewal_and_release_find_their_messages_by_primary_key(
    loaded: asyncpg.Pool,
) -> None:
    held = await sending_ids(loaded, 64)
    for name, params in (
        ("renew_leases", (held, "worker-1", 60.0)),
        ("release_messages", (held, "w")),
    ):
        async with loaded.acquire() as conn, conn.transaction():
            plan = await explain(conn, await function_body(conn, name), *params)
        assert_uses_index(plan, "messages_pkey", big_tables=BIG_TABLES)
    plan = await explain(loaded, store._START_RESEND, held[0], "worker-1")
    assert_uses_index(plan, "messages_pkey", big_tables=BIG_TABLES)


async def test_a_batch_of_results_is_written_by_primary_key(loaded: asyncpg.Pool) -> None:
    """The worker's hottest statement: 200 sends written at once, with attempts and events."""
    held = await sending_ids(loaded, 200)
    resolutions = [
        Resolution(
            message_id,
            "shop-42",
            MessageStatus.SENT,
            attempts=(
                AttemptRecord(AttemptOutcome.ACCEPTED, NOW, NOW, 201, twilio_sid=sid(MESSAGES + n)),
            ),
            attempt_increment=1,
            twilio_sid=sid(MESSAGES + n),
            twilio_status="queued",
            sent_at=NOW,
            events=(PendingEvent(events.SENT_SUBJECT, b"sent"),),
        )
        for n, message_id in enumerate(held)
    ]
    rows = store._resolution_rows(resolutions)
    async with loaded.acquire() as conn, conn.transaction():
        body = await function_body(conn, "record_resolutions")
        plan = await explain(conn, body, "worker-1", *rows)
    assert_uses_index(plan, "messages_pkey", big_tables=BIG_TABLES)
    assert_uses_index(plan, "messages_twilio_sid_key", big_tables=BIG_TABLES)


async def test_the_backlog_is_counted_on_the_partial_indexes(loaded: asyncpg.Pool) -> None:
    plan = await explain(loaded, store._BACKLOG)
    assert_uses_index(plan, "messages_due_idx", big_tables=BIG_TABLES)
    assert_uses_index(plan, "messages_dead_letters_idx", big_tables=BIG_TABLES)


async def test_enqueue_checks_and_finds_the_idempotency_key_on_its_index(
    loaded: asyncpg.Pool,
) -> None:
    key = "reply:" + "0" * 32
    plan = await explain(loaded, store._EXISTING_MANY, ["shop-42"], [key])
    assert_uses_index(plan, "messages_tenant_idempotency_key_key", big_tables=BIG_TABLES)
    plan = await explain(
        loaded,
        store._ENQUEUE_MANY,
        ["shop-42"],
        [key],
        [""],
        ["conversational"],
        [ACCOUNT_SID],
        ["whatsapp:+14155238886"],
        ["whatsapp"],
        [phone(42)],
        ["Merci !"],
        [None],
        [None],
        [None],
        [5],
        [None],
        "worker-1",
        60.0,
        [True],
    )
    assert_uses_index(plan, "messages_tenant_idempotency_key_key", big_tables=BIG_TABLES)


@pytest.mark.parametrize("after", [None, (NOW - timedelta(days=10), uuid.UUID(int=0))])
async def test_list_dead_letters_pages_on_the_dead_letters_index(
    loaded: asyncpg.Pool, after: tuple[datetime, uuid.UUID] | None
) -> None:
    dead_at, message_id = after or (None, None)
    plan = await explain(
        loaded, store._DEAD_LETTERS, "shop-big", dead_at, message_id, None, None, None, 51
    )
    assert_uses_index(plan, "messages_dead_letters_idx", big_tables=BIG_TABLES)


async def test_status_callback_finds_the_message_by_twilio_sid(loaded: asyncpg.Pool) -> None:
    plan = await explain(loaded, store._BY_SID, DELIVERED_SID)
    assert_uses_index(plan, "messages_twilio_sid_key", big_tables=BIG_TABLES)


@pytest.fixture
async def delivered(loaded: asyncpg.Pool) -> asyncpg.Record:
    """(id, tenant_id) of the delivered message DELIVERED_SID."""
    row = await loaded.fetchrow(
        "SELECT id, tenant_id FROM messages WHERE twilio_sid = $1", DELIVERED_SID
    )
    assert row is not None
    return row


async def test_a_status_callback_advances_its_message_by_primary_key(
    loaded: asyncpg.Pool, delivered: asyncpg.Record
) -> None:
    plan = await explain(
        loaded, store._ADVANCE, delivered["id"], "delivered", "delivered", None, None
    )
    assert_uses_index(plan, "messages_pkey", big_tables=BIG_TABLES)
    plan = await explain(loaded, store._TWILIO_STATUS_ONLY, delivered["id"], "read")
    assert_uses_index(plan, "messages_pkey", big_tables=BIG_TABLES)


async def test_get_message_reads_it_and_its_attempts_on_their_indexes(
    loaded: asyncpg.Pool, delivered: asyncpg.Record
) -> None:
    plan = await explain(loaded, store._GET, delivered["id"], delivered["tenant_id"])
    assert_uses_index(plan, "messages_pkey", big_tables=BIG_TABLES)
    plan = await explain(loaded, store._ATTEMPTS, delivered["id"])
    assert_uses_index(plan, "attempts_message_id_idx", big_tables=BIG_TABLES)


@pytest.mark.parametrize(("sql", "extra"), [(store._REDRIVE, (5,)), (store._DISCARD, ())])
async def test_redrive_and_discard_find_dead_letters_by_primary_key(
    loaded: asyncpg.Pool, sql: str, extra: tuple[object, ...]
) -> None:
    rows = await loaded.fetch("SELECT id FROM messages WHERE tenant_id = 'shop-big' LIMIT 20")
    plan = await explain(loaded, sql, [row["id"] for row in rows], "shop-big", *extra)
    assert_uses_index(plan, "messages_pkey", big_tables=BIG_TABLES)


async def test_reconciliation_check_uses_the_recipient_and_sid_indexes(
    loaded: asyncpg.Pool,
) -> None:
    plan = await explain(
        loaded,
        store._RECONCILE_CHECK,
        phone(42),
        "whatsapp:+14155238886",
        uuid.UUID(int=42),
        [sid(42), sid(43)],
    )
    assert_uses_index(plan, "messages_sending_recipient_idx", big_tables=BIG_TABLES)
    assert_uses_index(plan, "messages_twilio_sid_key", big_tables=BIG_TABLES)


async def test_finished_purge_finds_old_messages_by_the_finished_index(
    loaded: asyncpg.Pool,
) -> None:
    # The steady state: an hourly run finds the hour that just went past 30 days.
    plan = await explain(loaded, store.DELETE_FINISHED_MESSAGES, timedelta(days=30), 1000)
    assert_uses_index(plan, "messages_finished_idx", big_tables=BIG_TABLES)
    assert_uses_index(plan, "messages_pkey", big_tables=BIG_TABLES)


STATUSES = (
    "pending", "sending", "sent", "delivered", "read", "failed", "undelivered", "blocked",
    "dead", "discarded",
)  # fmt: skip
KEPT_WHATEVER_THEIR_AGE = {"pending", "sending", "dead"}


async def add_message(pool: asyncpg.Pool, status: str, age: timedelta) -> uuid.UUID:
    """A message in `status`, last changed `age` ago, with two attempts."""
    accepted = status in ("sent", "delivered", "read", "failed", "undelivered")
    message_id = await pool.fetchval(
        """
        INSERT INTO messages (tenant_id, idempotency_key, kind, account_sid, sender,
            recipient_channel, recipient, body, status, max_attempts, lease_owner,
            lease_expires_at, twilio_sid, dead_reason, created_at, updated_at)
        VALUES ('shop-1', gen_random_uuid()::text, 'conversational', $1, '+14155238886', 'sms',
            '+33600000001', 'hi', $2, 5,
            CASE WHEN $2 = 'sending' THEN 'worker-1' END,
            CASE WHEN $2 = 'sending' THEN now() END,
            CASE WHEN $3 THEN 'SM' || md5(random()::text) END,
            CASE WHEN $2 = 'dead' THEN 'permanent_error' END,
            now() - $4::interval, now() - $4::interval)
        RETURNING id
        """,
        ACCOUNT_SID,
        status,
        accepted,
        age,
    )
    await pool.execute(
        "INSERT INTO attempts (message_id, outcome, started_at, finished_at, worker_id)"
        " SELECT $1, 'retryable_error', now(), now(), 'w' FROM generate_series(1, 2)",
        message_id,
    )
    return message_id


async def test_retention_purges_old_finished_messages_with_their_attempts(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute("TRUNCATE messages, attempts, events")
    old = {status: await add_message(pool, status, timedelta(days=31)) for status in STATUSES}
    recent = {status: await add_message(pool, status, timedelta(days=29)) for status in STATUSES}
    await pool.execute(
        "INSERT INTO events (subject, aggregate_id, payload, published_at) VALUES"
        " ($1, 'old', '', now() - interval '8 days'), ($1, 'unpublished', '', NULL)",
        events.SENT_SUBJECT,
    )
    settings = RetentionSettings(interval_s=3600, batch_size=2, events_max_age=timedelta(7))
    purges = store.finished_message_purges(timedelta(days=30))
    task = RetentionTask.from_settings(pool, settings, purges)

    assert await task.run_once() == {"events": 1, "messages": 7}
    left = {row["id"] for row in await pool.fetch("SELECT id FROM messages")}
    assert left == {old[s] for s in KEPT_WHATEVER_THEIR_AGE} | set(recent.values())
    attempts_of = await pool.fetch("SELECT DISTINCT message_id FROM attempts")
    assert {row["message_id"] for row in attempts_of} == left
    assert await pool.fetchval("SELECT aggregate_id FROM events") == "unpublished"


def test_finished_messages_kept_forever_have_no_purge() -> None:
    assert store.finished_message_purges(None) == []


async def test_the_process_purges_old_finished_messages_and_published_events(
    admin_dsn: str, nats_url: str, token_keys: DevKeys
) -> None:
    env = {
        "OUTBOX_FINISHED_RETENTION_DAYS": "2",
        "OUTBOX_WORKER_ENABLED": "false",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": "token",
        "PUBLIC_BASE_URL": "https://example.test",
    }
    async with process_with_fast_retention(admin_dsn, nats_url, SERVICE, env) as conn:
        for status, days in (("delivered", 3), ("delivered", 1), ("dead", 9)):
            await conn.execute(
                """
                INSERT INTO messages (tenant_id, idempotency_key, kind, account_sid, sender,
                    recipient_channel, recipient, body, status, max_attempts, twilio_sid,
                    dead_reason, updated_at)
                VALUES ('shop-1', $2, 'conversational', $3, '+14155238886', 'sms',
                    '+33600000001', 'hi', $1, 5,
                    CASE WHEN $1 = 'delivered' THEN 'SM' || md5($2) END,
                    CASE WHEN $1 = 'dead' THEN 'permanent_error' END,
                    now() - make_interval(days => $4))
                """,
                status,
                f"{days} days {status}",
                ACCOUNT_SID,
                days,
            )
        await conn.execute(
            "INSERT INTO events (subject, aggregate_id, payload, published_at)"
            " VALUES ($1, 'old', '', now() - interval '3 days')",
            events.SENT_SUBJECT,
        )
        await wait_until_zero(
            conn, "SELECT count(*) FROM messages WHERE idempotency_key = '3 days delivered'"
        )
        await wait_until_zero(conn, "SELECT count(*) FROM events")
        left = await conn.fetch("SELECT idempotency_key FROM messages ORDER BY 1")
        assert [row["idempotency_key"] for row in left] == ["1 days delivered", "9 days dead"]
