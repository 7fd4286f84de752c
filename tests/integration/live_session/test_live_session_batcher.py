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


async def test_a_database_failure_reaches_every_waiting_caller(
    service_dsn: str, clock: ManualClock
) -> None:
    closed_pool = await create_pool(service_dsn, SERVICE, min_size=1, max_size=1)
    await closed_pool.close()
    batcher = TouchBatcher(SessionStore(closed_pool, clock, WINDOW))

    results = await asyncio.gather(
        *(batcher.touch(f"shop-{i % 3}", SELLER, "") for i in range(9)), return_exceptions=True
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
