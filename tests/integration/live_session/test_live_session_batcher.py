"""TouchBatcher in front of the real store: concurrent calls share bump statements and
sessions, each tenant opens once, failures reach every caller, a caller giving up harms none."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

import asyncpg
import pytest

from infra.db import create_pool
from services.live_session.domain import LiveSession, ManualClock, SignalKind
from services.live_session.store import SessionStore
from services.live_session.touch_batcher import TouchBatcher
from tests.integration.live_session.conftest import SERVICE, WINDOW

SELLER = SignalKind.SELLER_MESSAGE


class CountingStore(SessionStore):
    """The real store, counting the bump statements it runs."""

    def __init__(self, pool: asyncpg.Pool, clock: ManualClock) -> None:
        super().__init__(pool, clock, WINDOW)
        self.bump_batches: list[int] = []

    async def bump_current(self, tenant_ids: Sequence[str]) -> dict[str, LiveSession]:
        self.bump_batches.append(len(tenant_ids))
        return await super().bump_current(tenant_ids)


async def test_concurrent_touches_share_statements_and_sessions(
    pool: asyncpg.Pool, clock: ManualClock, clean_tables: None
) -> None:
    store = CountingStore(pool, clock)
    batcher = TouchBatcher(store, max_in_flight=2)
    tenants = [f"shop-{i}" for i in range(10)]

    results = await asyncio.gather(
        *(batcher.touch(tenants[i % 10], SELLER, f"SM{i}") for i in range(100))
    )

    by_tenant: dict[str, set[object]] = {}
    for result in results:
        by_tenant.setdefault(result.session.tenant_id, set()).add(result.session.id)
    assert all(len(ids) == 1 for ids in by_tenant.values()) and len(by_tenant) == 10
    assert sum(result.created for result in results) == 10
    assert len(store.bump_batches) <= 4  # not one per call
    assert await pool.fetchval("SELECT count(*) FROM events") == 10

    clock.advance(timedelta(minutes=1))
    again = await asyncio.gather(*(batcher.touch(t, SELLER, "") for t in tenants * 5))
    assert not any(result.created for result in again)
    assert {r.session.tenant_id: r.session.id for r in again} == {
        r.session.tenant_id: r.session.id for r in results
    }
    assert all(r.session.last_activity_at == clock.now() for r in again)


async def test_a_batch_mixing_current_stale_and_new_tenants(
    pool: asyncpg.Pool, clock: ManualClock, clean_tables: None
) -> None:
    store = SessionStore(pool, clock, WINDOW)
    batcher = TouchBatcher(store)
    stale = await store.touch("stale", SELLER, "")
    clock.advance(WINDOW - timedelta(minutes=1))
    current = await store.touch("current", SELLER, "")
    clock.advance(timedelta(minutes=1))

    results = await asyncio.gather(
        batcher.touch("stale", SELLER, "a"),
        batcher.touch("current", SELLER, "b"),
        batcher.touch("new", SELLER, "c"),
    )

    assert [r.created for r in results] == [True, False, True]
    assert results[0].session.id != stale.session.id
    assert results[1].session.id == current.session.id
    assert await pool.fetchval("SELECT count(*) FROM sessions WHERE status = 'active'") == 3


async def test_an_extend_alone_opens_nothing_and_extends_an_active_session(
    pool: asyncpg.Pool, clock: ManualClock, clean_tables: None
) -> None:
    store = SessionStore(pool, clock, WINDOW)
    batcher = TouchBatcher(store)

    assert await batcher.extend("shop-1") is None
    assert await pool.fetchval("SELECT count(*) FROM sessions") == 0
    assert await pool.fetchval("SELECT count(*) FROM events") == 0

    opened = await batcher.touch("shop-1", SELLER, "SM1")
    clock.advance(timedelta(minutes=1))
    extended = await batcher.extend("shop-1")
    assert extended is not None and extended.id == opened.session.id
    assert extended.last_activity_at == clock.now()

    clock.advance(WINDOW * 2)  # idle past the window: ended, and an extend never reopens it
    assert await batcher.extend("shop-1") is None
    assert await pool.fetchval("SELECT count(*) FROM sessions") == 1
    assert await pool.fetchval("SELECT count(*) FROM events") == 1


async def test_a_batch_mixing_extends_and_touches(
    pool: asyncpg.Pool, clock: ManualClock, clean_tables: None
) -> None:
    store = CountingStore(pool, clock)
    batcher = TouchBatcher(store)
    current = await store.touch("current", SELLER, "")
    clock.advance(timedelta(minutes=1))
    store.bump_batches.clear()

    extends = [batcher.extend(t) for t in ("current", "idle", "opening") for _ in range(5)]
    touches = [batcher.touch("opening", SELLER, f"SM{i}") for i in range(3)]
    *extended, t1, t2, t3 = await asyncio.gather(*extends, *touches)

    assert len(store.bump_batches) == 1  # one statement for the whole mixed batch
    on_current, on_idle, on_opening = extended[:5], extended[5:10], extended[10:]
    assert all(s is not None and s.id == current.session.id for s in on_current)
    assert all(s is not None and s.last_activity_at == clock.now() for s in on_current)
    assert on_idle == [None] * 5  # nobody of that tenant may open one
    assert [t1.created, t2.created, t3.created].count(True) == 1
    assert {t1.session.id, t2.session.id, t3.session.id} == {
        s.id for s in on_opening if s is not None
    }
    assert len([s for s in on_opening if s is not None]) == 5
    tenants = await pool.fetch("SELECT tenant_id FROM sessions WHERE status = 'active'")
    assert sorted(row["tenant_id"] for row in tenants) == ["current", "opening"]


async def test_a_database_failure_reaches_every_waiting_caller(
    service_dsn: str, clock: ManualClock
) -> None:
    closed_pool = await create_pool(service_dsn, SERVICE, min_size=1, max_size=1)
    await closed_pool.close()
    batcher = TouchBatcher(SessionStore(closed_pool, clock, WINDOW))

    results = await asyncio.gather(
        *(batcher.touch(f"shop-{i % 3}", SELLER, "") for i in range(9)),
        *(batcher.extend(f"shop-{i % 3}") for i in range(6)),
        return_exceptions=True,
    )

    assert all(isinstance(result, asyncpg.InterfaceError) for result in results)


async def test_a_caller_that_gives_up_does_not_cancel_the_others(
    pool: asyncpg.Pool, clock: ManualClock, clean_tables: None
) -> None:
    batcher = TouchBatcher(SessionStore(pool, clock, WINDOW))
    impatient = asyncio.ensure_future(batcher.touch("shop-1", SELLER, ""))
    patient = asyncio.ensure_future(batcher.touch("shop-1", SELLER, ""))
    await asyncio.sleep(0)
    impatient.cancel()

    result = await patient
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert await pool.fetchval("SELECT count(*) FROM sessions") == 1
    assert result.session.tenant_id == "shop-1" and result.created
