"""live_session's data hygiene on a real PostgreSQL: only known event subjects are stored, the
hot queries run on indexes at a realistic size, and old published events are purged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from infra.retention import RetentionSettings, RetentionTask
from services.live_session import events, store
from services.live_session.domain import idle_cutoff
from tests.integration.data_hygiene import (
    assert_process_purges_old_events,
    assert_subject_accepted,
    assert_uses_index,
    explain,
    insert_event,
    known_subjects,
    recorded_subjects,
)
from tests.integration.live_session.conftest import SERVICE, WINDOW
from tools.dev_keys import DevKeys

TENANTS = 5_000
CLOSED_PER_TENANT = 9
BIG_TABLES = ("sessions",)
NOW = datetime.now(UTC)
CUTOFF = idle_cutoff(NOW, WINDOW)


async def test_events_table_rejects_an_unknown_subject(pool: asyncpg.Pool) -> None:
    assert await known_subjects(pool)
    with pytest.raises(asyncpg.CheckViolationError) as raised:
        await insert_event(pool, "live_session.v1.session.reopened")
    assert raised.value.constraint_name == "events_subject_known"


async def test_every_subject_the_code_records_is_allowed(pool: asyncpg.Pool) -> None:
    subjects = recorded_subjects(SERVICE)
    assert {events.SESSION_CREATED_SUBJECT, events.SESSION_CLOSED_SUBJECT} <= subjects
    assert subjects <= await known_subjects(pool)
    for subject in sorted(subjects):
        await assert_subject_accepted(pool, subject)


@pytest.fixture(scope="module")
async def loaded(pool: asyncpg.Pool) -> asyncpg.Pool:
    """5k shops with 9 closed sessions each over the past days; 4 in 5 have an active one,
    idle for 0-89 minutes (so about half are past the window, as before a sweep). 49k rows."""
    await pool.execute("TRUNCATE sessions, events")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO sessions
                (id, tenant_id, status, started_at, last_activity_at, closed_at, close_reason)
            SELECT gen_random_uuid(), 'shop-' || t, 'closed', start, start + interval '2 hours',
                   start + interval '3 hours', 'idle'
            FROM generate_series(1, $1) t, generate_series(1, $2) d,
                 LATERAL (SELECT $3::timestamptz - make_interval(days => d) AS start) s
            """,
            TENANTS,
            CLOSED_PER_TENANT,
            NOW,
        )
        await conn.execute(
            """
            INSERT INTO sessions (id, tenant_id, status, started_at, last_activity_at)
            SELECT gen_random_uuid(), 'shop-' || t, 'active', $2::timestamptz - interval '2 hours',
                   $2::timestamptz - make_interval(mins => t % 90)
            FROM generate_series(1, $1) t WHERE t % 5 <> 0
            """,
            TENANTS,
            NOW,
        )
    await pool.execute("ANALYZE sessions")
    return pool


async def test_touch_bump_finds_current_sessions_by_the_one_active_index(
    loaded: asyncpg.Pool,
) -> None:
    tenants = [f"shop-{t}" for t in range(100, 164)]  # a coalesced batch of Touch calls
    plan = await explain(loaded, store._BUMP_CURRENT, tenants, NOW, CUTOFF)
    assert_uses_index(plan, "sessions_one_active_per_tenant", big_tables=BIG_TABLES)


async def test_touch_open_path_uses_the_one_active_index(loaded: asyncpg.Pool) -> None:
    plan = await explain(loaded, store._CLOSE_STALE, "shop-5", NOW, CUTOFF)
    assert_uses_index(plan, "sessions_one_active_per_tenant", big_tables=BIG_TABLES)
    plan = await explain(
        loaded, store._OPEN_OR_BUMP, "00000000-0000-7000-8000-000000000001", "shop-5", NOW, CUTOFF
    )
    assert_uses_index(plan, "sessions_one_active_per_tenant", big_tables=BIG_TABLES)


async def test_current_session_lookup_uses_the_one_active_index(loaded: asyncpg.Pool) -> None:
    plan = await explain(loaded, store._CURRENT, "shop-42", CUTOFF)
    assert_uses_index(plan, "sessions_one_active_per_tenant", big_tables=BIG_TABLES)


async def test_sweeper_scans_idle_sessions_on_the_activity_index(loaded: asyncpg.Pool) -> None:
    plan = await explain(loaded, store._CLOSE_IDLE_BATCH, CUTOFF, NOW, 100)
    assert_uses_index(plan, "sessions_active_by_last_activity", big_tables=BIG_TABLES)


@pytest.mark.parametrize(
    ("status", "after"),
    [
        (None, None),
        ("closed", None),
        ("closed", (NOW - timedelta(days=4), "00000000-0000-7000-8000-000000000001")),
    ],
)
async def test_list_sessions_pages_on_the_tenant_index(
    loaded: asyncpg.Pool, status: str | None, after: tuple[datetime, str] | None
) -> None:
    started_at, session_id = after or (None, None)
    plan = await explain(loaded, store._LIST, "shop-7", status, started_at, session_id, 51)
    assert_uses_index(plan, "sessions_by_tenant_newest", big_tables=BIG_TABLES)


async def test_retention_purges_published_events_older_than_the_window(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute("TRUNCATE events")
    await pool.execute(
        "INSERT INTO events (subject, aggregate_id, payload, created_at, published_at)"
        " SELECT $1, g::text, '', now() - interval '9 days', now() - interval '8 days'"
        " FROM generate_series(1, 25) g",
        events.SESSION_CLOSED_SUBJECT,
    )
    await pool.execute(
        "INSERT INTO events (subject, aggregate_id, payload, created_at, published_at)"
        " VALUES ($1, 'recent', '', now(), now()),"
        " ($1, 'unpublished', '', now() - interval '9 days', NULL)",
        events.SESSION_CLOSED_SUBJECT,
    )
    settings = RetentionSettings(interval_s=3600, batch_size=10, events_max_age=timedelta(7))

    assert await RetentionTask.from_settings(pool, settings).run_once() == {"events": 25}
    left = await pool.fetch("SELECT aggregate_id FROM events ORDER BY aggregate_id")
    assert [row["aggregate_id"] for row in left] == ["recent", "unpublished"]


async def test_the_process_purges_old_published_events(
    admin_dsn: str, nats_url: str, token_keys: DevKeys
) -> None:
    await assert_process_purges_old_events(
        admin_dsn, nats_url, SERVICE, events.SESSION_CLOSED_SUBJECT
    )
