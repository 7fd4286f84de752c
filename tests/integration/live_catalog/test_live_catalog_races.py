"""Concurrency against the real PostgreSQL: a burst of claims on one unit, a cancel racing two
hold sweepers, and the same MessageSid delivered concurrently."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta

import asyncpg
import pytest

from infra.db import create_pool
from services.live_catalog.consumer import Batches
from services.live_catalog.domain import Inbound, SettingsBook
from services.live_catalog.store import CatalogStore
from tests.integration.live_catalog.conftest import HOLD, ManualClock, inbound

pytestmark = pytest.mark.usefixtures("clean_tables")


async def one_unit_and_1000_claims(
    store: CatalogStore, clock: ManualClock, tenant: str, session_id: uuid.UUID
) -> list[Inbound]:
    """Item A12 posted with stock 1, and 1,000 clients' claims of it 1 ms apart."""
    await store.handle_inbound(
        inbound("A12 Robe 25€ x1", tenant=tenant, session=session_id, seller=True)
    )
    return [
        inbound(
            "A12",
            tenant=tenant,
            session=session_id,
            sender=f"+3361{i:07d}",
            at=clock.now + timedelta(milliseconds=i),
        )
        for i in range(1000)
    ]


async def test_1000_concurrent_claims_on_one_unit_hold_1_and_waitlist_999_in_received_order(
    store: CatalogStore, pool: asyncpg.Pool, clock: ManualClock, tenant, session_id
) -> None:
    claims = await one_unit_and_1000_claims(store, clock, tenant, session_id)
    shuffled = random.Random(7).sample(claims, len(claims))  # processing order != arrival order
    outcomes = await asyncio.gather(*(store.handle_inbound(claim) for claim in shuffled))

    assert sorted(set(outcomes)) == ["held", "waiting"]
    assert outcomes.count("held") == 1
    item = await pool.fetchrow("SELECT stock, held, confirmed, waiting FROM items")
    assert dict(item) == {"stock": 1, "held": 1, "confirmed": 0, "waiting": 999}
    waitlist = await pool.fetch(
        "SELECT client_value FROM reservations WHERE status = 'waiting'"
        " ORDER BY received_at, message_sid"
    )
    by_arrival = [c.contact.value for c in claims]
    holder = await pool.fetchval("SELECT client_value FROM reservations WHERE status = 'held'")
    assert [row["client_value"] for row in waitlist] == [v for v in by_arrival if v != holder]
    assert await pool.fetchval("SELECT count(*) FROM replies WHERE body LIKE 'A12 est%'") == 1000

    # Serving the waitlist one unit at a time follows arrival order.
    await store.update_item(
        tenant,
        await pool.fetchval("SELECT id FROM items"),
        title=None,
        price_cents=None,
        stock=4,
        max_per_client=None,
        correlation="",
    )
    promoted = await pool.fetch(
        "SELECT client_value FROM reservations WHERE status = 'held' AND client_value <> $1"
        " ORDER BY received_at",
        holder,
    )
    assert [row["client_value"] for row in promoted] == [v for v in by_arrival if v != holder][:3]


async def test_1000_claims_delivered_together_in_any_order_are_served_in_received_order(
    store: CatalogStore, pool: asyncpg.Pool, clock: ManualClock, tenant, session_id
) -> None:
    # As the consumer hands them over: every message in flight goes into one batch.
    claims = await one_unit_and_1000_claims(store, clock, tenant, session_id)
    batches = Batches(store)
    delivered = random.Random(5).sample(claims, len(claims))
    outcomes = await asyncio.gather(*(batches.submit(claim) for claim in delivered))

    assert (outcomes.count("held"), outcomes.count("waiting")) == (1, 999)
    by_arrival = [c.contact.value for c in claims]
    rows = await pool.fetch(
        "SELECT client_value, status FROM reservations ORDER BY received_at, message_sid"
    )
    assert [r["client_value"] for r in rows] == by_arrival
    assert [r["status"] for r in rows] == ["held"] + ["waiting"] * 999
    # Each waiter was told its true place in the line.
    told = await pool.fetch(
        "SELECT recipient_value, body FROM replies WHERE body LIKE '%liste d''attente%'"
    )
    place = {r["recipient_value"]: r["body"] for r in told}
    assert all(f"n°{k} " in place[who] for k, who in enumerate(by_arrival[1:], start=1))


async def test_a_cancel_racing_two_sweepers_promotes_each_freed_unit_exactly_once(
    store: CatalogStore, pool: asyncpg.Pool, clock: ManualClock, tenant, session_id
) -> None:
    # 20 items of stock 1, each with one hold and two waiters; every hold has lapsed, and
    # its holder cancels at the same moment as two sweeper replicas run.
    holders = []
    for n in range(20):
        code = f"A{n + 1}"
        await store.handle_inbound(
            inbound(f"{code} Robe 25€ x1", tenant=tenant, session=session_id, seller=True)
        )
        for k in range(3):
            await store.handle_inbound(
                inbound(
                    code,
                    tenant=tenant,
                    session=session_id,
                    sender=f"+33{n:03d}{k}",
                    at=clock.now + timedelta(seconds=k),
                )
            )
        holders.append((code, f"+33{n:03d}0"))
    clock.advance(HOLD + timedelta(seconds=1))

    async def sweep() -> None:
        while (await store.expire_holds(batch=3))[0]:
            pass

    cancels = [
        store.handle_inbound(inbound(f"ANNULER {code}", tenant=tenant, session=None, sender=who))
        for code, who in holders
    ]
    await asyncio.gather(sweep(), sweep(), *cancels)

    rows = await pool.fetch("SELECT code, held, waiting FROM items ORDER BY code")
    assert {(row["held"], row["waiting"]) for row in rows} == {(1, 1)}
    promoted = await pool.fetchval(
        "SELECT count(*) FROM events WHERE subject = 'live_catalog.v1.reservation.promoted'"
    )
    assert promoted == 20
    # The second in line got each unit; nobody was told twice.
    second = await pool.fetch(
        "SELECT client_value FROM reservations WHERE status = 'held' ORDER BY client_value"
    )
    assert [row["client_value"] for row in second] == [f"+33{n:03d}1" for n in range(20)]
    assert await pool.fetchval("SELECT count(*) FROM replies WHERE body LIKE '% est à vous%'") == 20


async def test_the_same_message_sid_delivered_concurrently_claims_once(
    store: CatalogStore, pool: asyncpg.Pool, tenant, session_id
) -> None:
    await store.handle_inbound(
        inbound("A12 Robe 25€ x5", tenant=tenant, session=session_id, seller=True)
    )
    claim = inbound("A12", tenant=tenant, session=session_id, sid="SMconcurrent")
    outcomes = await asyncio.gather(*(store.handle_inbound(claim) for _ in range(3)))
    assert sorted(outcomes) == ["duplicate", "duplicate", "held"]
    assert await pool.fetchval("SELECT held FROM items") == 1
    assert (
        await pool.fetchval("SELECT count(*) FROM replies WHERE correlation_id = 'SMconcurrent'")
        == 1
    )


async def test_five_replicas_share_1000_claims_on_stock_10_without_oversell(
    store: CatalogStore,
    pool: asyncpg.Pool,
    service_dsn: str,
    clock: ManualClock,
    tenant,
    session_id,
) -> None:
    await store.handle_inbound(
        inbound("A12 Robe 25€ x10", tenant=tenant, session=session_id, seller=True)
    )
    # Five consumer replicas: each its own store and connection pool, as five processes.
    pools = [
        await create_pool(service_dsn, "live_catalog", min_size=1, max_size=6) for _ in range(5)
    ]
    try:
        replicas = [
            CatalogStore(p, clock, hold=HOLD, settings=SettingsBook(), default_max_per_client=1)
            for p in pools
        ]
        claims = [
            inbound(
                "A12",
                tenant=tenant,
                session=session_id,
                sender=f"+3362{i:07d}",
                at=clock.now + timedelta(milliseconds=i),
            )
            for i in range(1000)
        ]
        order = random.Random(11).sample(range(1000), 1000)
        outcomes = await asyncio.gather(
            *(replicas[n % 5].handle_inbound(claims[i]) for n, i in enumerate(order))
        )
    finally:
        for p in pools:
            await p.close()

    assert (outcomes.count("held"), outcomes.count("waiting")) == (10, 990)
    item = await pool.fetchrow("SELECT stock, held, confirmed, waiting FROM items")
    assert dict(item) == {"stock": 10, "held": 10, "confirmed": 0, "waiting": 990}
    waitlist = await pool.fetch(
        "SELECT client_value FROM reservations WHERE status = 'waiting'"
        " ORDER BY received_at, message_sid"
    )
    holders = {
        row["client_value"]
        for row in await pool.fetch("SELECT client_value FROM reservations WHERE status = 'held'")
    }
    by_arrival = [c.contact.value for c in claims if c.contact.value not in holders]
    assert [row["client_value"] for row in waitlist] == by_arrival


async def test_five_consumer_replicas_batching_1000_claims_on_two_items_never_oversell(
    store: CatalogStore,
    pool: asyncpg.Pool,
    service_dsn: str,
    clock: ManualClock,
    tenant,
    session_id,
) -> None:
    for body in ("A12 Robe 25€ x10", "B7 Sac 40€ x3"):
        await store.handle_inbound(inbound(body, tenant=tenant, session=session_id, seller=True))
    # Five replicas, each gathering the claims it is handed into batches, racing on both items.
    pools = [
        await create_pool(service_dsn, "live_catalog", min_size=1, max_size=6) for _ in range(5)
    ]
    try:
        replicas = [
            Batches(
                CatalogStore(p, clock, hold=HOLD, settings=SettingsBook(), default_max_per_client=2)
            )
            for p in pools
        ]
        claims = [
            inbound(
                ("A12", "B7")[i % 2] + ("" if i % 3 else " x2"),
                tenant=tenant,
                session=session_id,
                sender=f"+3363{i:07d}",
                at=clock.now + timedelta(milliseconds=i),
            )
            for i in range(1000)
        ]
        order = random.Random(13).sample(range(1000), 1000)
        outcomes = await asyncio.gather(
            *(replicas[n % 5].submit(claims[i]) for n, i in enumerate(order))
        )
    finally:
        for p in pools:
            await p.close()

    assert set(outcomes) == {"held", "waiting"}
    items = await pool.fetch(
        "SELECT i.code, i.stock, i.held, i.waiting,"
        " (SELECT coalesce(sum(quantity), 0) FROM reservations r"
        "  WHERE r.item_id = i.id AND r.status = 'held') AS held_rows,"
        " (SELECT count(*) FROM reservations r"
        "  WHERE r.item_id = i.id AND r.status = 'waiting') AS waiting_rows"
        " FROM items i ORDER BY i.code"
    )
    for item in items:
        assert item["held"] == item["held_rows"] <= item["stock"]
        assert item["waiting"] == item["waiting_rows"]
        assert item["stock"] - item["held"] < 2  # no claim of 1 or 2 units left out
    assert sum(item["held_rows"] > 0 for item in items) == 2
    assert sum(item["waiting"] for item in items) == outcomes.count("waiting")
    assert await pool.fetchval("SELECT count(*) FROM replies") == 1000 + 2
