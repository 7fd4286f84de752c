"""The batched retention deleter and the events purge, against a real PostgreSQL: old published
events go in bounded batches, unpublished and recent ones stay, concurrent purgers share the
work without waiting on each other, and the events queries run on their indexes at scale."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from infra.db import create_pool, migrate_service
from infra.events import _CLAIM
from infra.retention import (
    DELETE_PUBLISHED_EVENTS,
    RetentionSettings,
    RetentionTask,
    delete_in_batches,
)
from tests.integration.data_hygiene import assert_uses_index, explain
from tools.stack import reset_service_schema

SERVICE = "retentiontest"
WEEK = timedelta(days=7)
SUBJECT = "retentiontest.v1.thing.happened"


@pytest.fixture(scope="module")
async def pool(admin_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A schema with only infra's tables (the events table)."""
    await reset_service_schema(admin_dsn, SERVICE)
    migrations = Path(__file__).parent / "no_migrations"
    migrations.mkdir(exist_ok=True)
    pool = await create_pool(await migrate_service(SERVICE, migrations), SERVICE, max_size=10)
    yield pool
    await pool.close()


async def add_events(
    pool: asyncpg.Pool, count: int, *, label: str, age: timedelta, published: bool = True
) -> None:
    """`count` events created `age` ago, published a minute later or never."""
    await pool.execute(
        """
        INSERT INTO events (subject, aggregate_id, payload, created_at, published_at)
        SELECT $1, $2, '', now() - $3::interval,
               CASE WHEN $4 THEN now() - $3::interval + interval '1 minute' END
        FROM generate_series(1, $5)
        """,
        SUBJECT,
        label,
        age,
        published,
        count,
    )


async def remaining(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT aggregate_id, count(*) FROM events GROUP BY aggregate_id")
    return {row["aggregate_id"]: row["count"] for row in rows}


@pytest.fixture
async def events(pool: asyncpg.Pool) -> asyncpg.Pool:
    """2,500 old published events, and what must survive: 40 old unpublished (still owed to
    JetStream) and 30 published a day ago."""
    await pool.execute("TRUNCATE events")
    await add_events(pool, 2_500, label="old", age=timedelta(days=8))
    await add_events(pool, 40, label="unpublished", age=timedelta(days=30), published=False)
    await add_events(pool, 30, label="recent", age=timedelta(days=1))
    return pool


async def test_a_batch_deletes_at_most_batch_size_rows_and_stop_ends_the_run(
    events: asyncpg.Pool,
) -> None:
    stopped = asyncio.Event()
    stopped.set()  # checked between batches: exactly one batch runs
    deleted = await delete_in_batches(events, DELETE_PUBLISHED_EVENTS, (WEEK,), 1000, stop=stopped)
    assert deleted == 1000
    assert (await remaining(events))["old"] == 1500


async def test_old_published_events_go_in_batches_unpublished_and_recent_stay(
    events: asyncpg.Pool,
) -> None:
    deleted = await delete_in_batches(events, DELETE_PUBLISHED_EVENTS, (WEEK,), 1000)
    assert deleted == 2500
    assert await remaining(events) == {"unpublished": 40, "recent": 30}
    # Nothing left to do: a further run is a no-op.
    assert await delete_in_batches(events, DELETE_PUBLISHED_EVENTS, (WEEK,), 1000) == 0


async def test_two_retention_tasks_at_once_share_the_rows(
    events: asyncpg.Pool, admin_dsn: str
) -> None:
    await add_events(events, 17_500, label="old", age=timedelta(days=9))  # 20,000 old in all
    other_pool = await create_pool(
        await migrate_service(SERVICE, Path(__file__).parent / "no_migrations"), SERVICE
    )
    settings = RetentionSettings(interval_s=3600, batch_size=500, events_max_age=WEEK)
    try:
        tasks = [RetentionTask.from_settings(p, settings).run_once() for p in (events, other_pool)]
        async with asyncio.timeout(60):
            results = await asyncio.gather(*tasks)
    finally:
        await other_pool.close()
    assert sum(result["events"] for result in results) == 20_000
    assert await remaining(events) == {"unpublished": 40, "recent": 30}


async def test_rows_locked_by_another_transaction_are_skipped_not_waited_for(
    events: asyncpg.Pool,
) -> None:
    async with events.acquire() as holder, holder.transaction():
        # As the relay or an operator would: a few old rows locked for a while.
        await holder.execute(
            "SELECT id FROM events WHERE aggregate_id = 'old' ORDER BY id LIMIT 5 FOR UPDATE"
        )
        async with asyncio.timeout(10):
            deleted = await delete_in_batches(events, DELETE_PUBLISHED_EVENTS, (WEEK,), 1000)
    assert deleted == 2495
    assert (await remaining(events))["old"] == 5


async def test_only_a_delete_statement_is_accepted(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="must be a DELETE"):
        await delete_in_batches(
            pool, "UPDATE events SET payload = '' WHERE $1::int > $2::int", (0,), 10
        )


@pytest.fixture(scope="module")
async def busy_events(pool: asyncpg.Pool) -> asyncpg.Pool:
    """A week and a day of events at ~6k a day (50k), a backlog of 150 unpublished."""
    await pool.execute("TRUNCATE events")
    await pool.execute(
        """
        INSERT INTO events (subject, aggregate_id, payload, created_at, published_at)
        SELECT $1, g::text, '\\x0a0b'::bytea, t, t + interval '50 milliseconds'
        FROM generate_series(1, 50000) g,
             LATERAL (SELECT now() - (50001 - g) * interval '13.8 seconds' AS t) moment
        """,
        SUBJECT,
    )
    await add_events(pool, 150, label="backlog", age=timedelta(seconds=2), published=False)
    await pool.execute("ANALYZE events")
    return pool


async def test_relay_claim_reads_only_the_unpublished_index(busy_events: asyncpg.Pool) -> None:
    plan = await explain(busy_events, _CLAIM, 200)
    assert_uses_index(plan, "events_unpublished_idx", big_tables=("events",))


async def test_events_purge_finds_old_rows_by_the_published_at_index(
    busy_events: asyncpg.Pool,
) -> None:
    plan = await explain(busy_events, DELETE_PUBLISHED_EVENTS, WEEK, 1000)
    assert_uses_index(plan, "events_published_at_idx", big_tables=("events",))
    assert_uses_index(plan, "events_pkey", big_tables=("events",))
