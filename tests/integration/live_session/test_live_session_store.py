"""SessionStore against a real PostgreSQL: get-or-create, idleness, manual close, listing, the
sweeper, concurrency, and the events each change records in its own transaction."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import pytest
from snapsell.live_session.v1 import events_pb2, live_session_pb2

from services.live_session.domain import (
    CloseReason,
    ManualClock,
    SessionStatus,
    SignalKind,
)
from services.live_session.store import SessionStore
from tests.integration.live_session.conftest import WINDOW

SELLER = SignalKind.SELLER_MESSAGE


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def events_of(pool: asyncpg.Pool, subject: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT aggregate_id, tenant_id, payload FROM events WHERE subject = $1 ORDER BY id",
        subject,
    )


async def test_first_touch_opens_a_session_and_records_created(
    store: SessionStore, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    result = await store.touch("shop-1", SELLER, "SM1")

    assert result.created
    session = result.session
    assert session.tenant_id == "shop-1"
    assert session.status is SessionStatus.ACTIVE
    assert session.started_at == session.last_activity_at == clock.now()
    [event] = await events_of(pool, "live_session.v1.session.created")
    assert event["aggregate_id"] == str(session.id) and event["tenant_id"] == "shop-1"
    created = events_pb2.LiveSessionCreated.FromString(event["payload"])
    assert created.session_id == str(session.id)
    assert created.correlation_id == "SM1"
    assert created.signal_kind == live_session_pb2.SIGNAL_KIND_SELLER_MESSAGE


async def test_second_touch_reuses_active_session_and_bumps_activity(
    store: SessionStore, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    first = await store.touch("shop-1", SELLER, "SM1")
    clock.advance(WINDOW - timedelta(seconds=1))
    second = await store.touch("shop-1", SignalKind.CLIENT_ITEM_CODE, "SM2")

    assert not second.created
    assert second.session.id == first.session.id
    assert second.session.started_at == first.session.started_at
    assert second.session.last_activity_at == clock.now()
    assert len(await events_of(pool, "live_session.v1.session.created")) == 1


async def test_touch_of_a_stale_active_session_closes_it_idle_and_opens_a_new_one(
    store: SessionStore, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    old = await store.touch("shop-1", SELLER, "SM1")
    clock.advance(WINDOW)  # exactly the window: idle
    new = await store.touch("shop-1", SELLER, "SM2")

    assert new.created and new.session.id != old.session.id
    rows = await pool.fetch("SELECT id, status, close_reason, closed_at FROM sessions")
    by_id = {row["id"]: row for row in rows}
    assert by_id[old.session.id]["status"] == "closed"
    assert by_id[old.session.id]["close_reason"] == "idle"
    assert by_id[old.session.id]["closed_at"] == clock.now()
    assert by_id[new.session.id]["status"] == "active"
    [closed_event] = await events_of(pool, "live_session.v1.session.closed")
    closed = events_pb2.LiveSessionClosed.FromString(closed_event["payload"])
    assert closed.session_id == str(old.session.id)
    assert closed.reason == live_session_pb2.CLOSE_REASON_IDLE
    assert closed.correlation_id == "SM2"
    assert closed.duration.ToTimedelta() == WINDOW
    assert len(await events_of(pool, "live_session.v1.session.created")) == 2


async def test_current_session_is_none_once_idle_even_before_the_sweep(
    store: SessionStore, clock: ManualClock
) -> None:
    assert await store.current("shop-1") is None
    opened = await store.touch("shop-1", SELLER, "")
    clock.advance(WINDOW - timedelta(microseconds=1))
    current = await store.current("shop-1")
    assert current is not None and current.id == opened.session.id
    clock.advance(timedelta(microseconds=1))
    assert await store.current("shop-1") is None


async def test_tenants_have_separate_sessions(store: SessionStore) -> None:
    a = await store.touch("shop-a", SELLER, "")
    b = await store.touch("shop-b", SELLER, "")
    assert a.created and b.created and a.session.id != b.session.id


async def test_manual_close_is_idempotent_and_records_one_event(
    store: SessionStore, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    opened = await store.touch("shop-1", SELLER, "")
    clock.advance(timedelta(minutes=5))
    first = await store.close("shop-1", opened.session.id, "op-1")
    second = await store.close("shop-1", opened.session.id, "op-2")

    assert first is not None and first.closed_now
    assert first.session.status is SessionStatus.CLOSED
    assert first.session.close_reason is CloseReason.MANUAL
    assert first.session.closed_at == clock.now()
    assert second is not None and not second.closed_now and second.session == first.session
    [event] = await events_of(pool, "live_session.v1.session.closed")
    closed = events_pb2.LiveSessionClosed.FromString(event["payload"])
    assert closed.reason == live_session_pb2.CLOSE_REASON_MANUAL
    assert closed.correlation_id == "op-1"
    assert closed.duration.ToTimedelta() == timedelta(minutes=5)
    # The tenant's next live signal opens a new session.
    assert (await store.touch("shop-1", SELLER, "")).created


async def test_manual_close_of_an_already_idle_session_records_idle(
    store: SessionStore, clock: ManualClock
) -> None:
    opened = await store.touch("shop-1", SELLER, "")
    clock.advance(WINDOW + timedelta(minutes=1))
    result = await store.close("shop-1", opened.session.id, "")
    assert result is not None and result.session.close_reason is CloseReason.IDLE


async def test_close_of_another_tenants_or_unknown_session_finds_nothing(
    store: SessionStore,
) -> None:
    opened = await store.touch("shop-1", SELLER, "")
    assert await store.close("shop-2", opened.session.id, "") is None
    assert await store.close("shop-1", uuid.uuid4(), "") is None
    assert (await store.current("shop-1")) is not None


async def test_list_pages_newest_first_and_filters_by_status(
    store: SessionStore, clock: ManualClock
) -> None:
    opened = []
    for _ in range(5):
        result = await store.touch("shop-1", SELLER, "")
        opened.append(result.session.id)
        clock.advance(WINDOW)
    await store.touch("shop-2", SELLER, "")  # another tenant's session never shows

    seen, cursor = [], None
    while True:
        page = await store.list("shop-1", None, 2, cursor)
        seen += [s.id for s in page.sessions]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(reversed(opened))
    active = await store.list("shop-1", SessionStatus.ACTIVE, 10)
    closed = await store.list("shop-1", SessionStatus.CLOSED, 10)
    assert [s.id for s in active.sessions] == [opened[-1]]
    assert [s.id for s in closed.sessions] == list(reversed(opened[:-1]))


async def test_sweeper_closes_only_sessions_idle_past_the_window(
    store: SessionStore, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    idle = await store.touch("shop-idle", SELLER, "")
    clock.advance(timedelta(minutes=10))
    fresh = await store.touch("shop-fresh", SELLER, "")
    clock.advance(WINDOW - timedelta(minutes=10))

    assert await store.close_idle_sessions() == 1
    statuses = dict(await pool.fetch("SELECT id, status FROM sessions"))
    assert statuses == {idle.session.id: "closed", fresh.session.id: "active"}
    [event] = await events_of(pool, "live_session.v1.session.closed")
    closed = events_pb2.LiveSessionClosed.FromString(event["payload"])
    assert closed.reason == live_session_pb2.CLOSE_REASON_IDLE and closed.correlation_id == ""
    assert await store.close_idle_sessions() == 0


async def insert_idle_sessions(pool: asyncpg.Pool, count: int, clock: ManualClock) -> None:
    old = clock.now() - WINDOW - timedelta(minutes=1)
    await pool.executemany(
        "INSERT INTO sessions (id, tenant_id, status, started_at, last_activity_at)"
        " VALUES ($1, $2, 'active', $3, $3)",
        [(uuid.uuid4(), f"bulk-{i}", old) for i in range(count)],
    )


async def test_two_sweepers_close_each_of_1000_idle_sessions_exactly_once(
    store: SessionStore, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    await insert_idle_sessions(pool, 1000, clock)
    other = SessionStore(pool, clock, WINDOW)

    closed_counts = await asyncio.gather(
        store.close_idle_sessions(batch=100), other.close_idle_sessions(batch=100)
    )

    assert sum(closed_counts) == 1000
    assert await pool.fetchval("SELECT count(*) FROM sessions WHERE status = 'active'") == 0
    per_session = await pool.fetch(
        "SELECT aggregate_id, count(*) AS n FROM events"
        " WHERE subject = 'live_session.v1.session.closed' GROUP BY aggregate_id"
    )
    assert len(per_session) == 1000 and {row["n"] for row in per_session} == {1}


async def test_sweeper_batches_until_none_remain(
    store: SessionStore, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    await insert_idle_sessions(pool, 250, clock)
    assert len(await store.close_idle_batch(100)) == 100
    assert await store.close_idle_sessions(batch=100) == 150


async def test_concurrent_touches_of_one_tenant_share_one_session(
    store: SessionStore, pool: asyncpg.Pool
) -> None:
    results = await asyncio.gather(*(store.touch("shop-1", SELLER, f"SM{i}") for i in range(60)))

    assert len({r.session.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert await pool.fetchval("SELECT count(*) FROM sessions") == 1
    assert len(await events_of(pool, "live_session.v1.session.created")) == 1


async def test_concurrent_touches_of_a_stale_session_close_it_once_and_share_the_new_one(
    store: SessionStore, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    old = await store.touch("shop-1", SELLER, "")
    clock.advance(WINDOW * 2)
    results = await asyncio.gather(*(store.touch("shop-1", SELLER, "") for _ in range(60)))

    new_ids = {r.session.id for r in results}
    assert len(new_ids) == 1 and old.session.id not in new_ids
    assert sum(r.created for r in results) == 1
    assert len(await events_of(pool, "live_session.v1.session.closed")) == 1
    assert len(await events_of(pool, "live_session.v1.session.created")) == 2


async def test_touches_racing_the_sweeper_never_leave_two_active_sessions(
    store: SessionStore, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    tenants = [f"race-{i}" for i in range(30)]
    for name in tenants:
        await store.touch(name, SELLER, "")
    clock.advance(WINDOW)
    sweep = asyncio.create_task(store.close_idle_sessions(batch=5))
    results = await asyncio.gather(*(store.touch(t, SELLER, "") for t in tenants for _ in range(3)))
    await sweep

    per_tenant: dict[str, set[uuid.UUID]] = {}
    for result in results:
        per_tenant.setdefault(result.session.tenant_id, set()).add(result.session.id)
    assert all(len(ids) == 1 for ids in per_tenant.values())
    active = await pool.fetch("SELECT tenant_id, id FROM sessions WHERE status = 'active'")
    assert {row["tenant_id"]: {row["id"]} for row in active} == per_tenant
    # Every old session closed exactly once, by the sweeper or by a Touch.
    closed_events = await pool.fetchval(
        "SELECT count(DISTINCT aggregate_id) = count(*) FROM events"
        " WHERE subject = 'live_session.v1.session.closed'"
    )
    assert closed_events
    assert await pool.fetchval("SELECT count(*) FROM sessions WHERE status = 'closed'") == 30


async def test_schema_refuses_a_second_active_session_for_a_tenant(
    store: SessionStore, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    await store.touch("shop-1", SELLER, "")
    with pytest.raises(asyncpg.UniqueViolationError, match="sessions_one_active_per_tenant"):
        await pool.execute(
            "INSERT INTO sessions (id, tenant_id, status, started_at, last_activity_at)"
            " VALUES ($1, 'shop-1', 'active', $2, $2)",
            uuid.uuid4(),
            clock.now(),
        )
