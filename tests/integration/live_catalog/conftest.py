"""The live_catalog schema on the session's real PostgreSQL, and a store driven by a manual
clock; `inbound()` builds routed messages as the consumer hands them to the store."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from infra.db import create_pool, migrate_service
from services.live_catalog.domain import Channel, Contact, Inbound, ReplyRoute, SettingsBook
from services.live_catalog.store import CatalogStore
from tools.stack import reset_service_schema

SERVICE = "live_catalog"
MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "live_catalog" / "migrations"
HOLD = timedelta(minutes=30)
SHOP = "whatsapp:+14155238886"
SELLER = "+33600000001"

_sids = itertools.count(1)


class ManualClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def inbound(
    body: str,
    *,
    tenant: str,
    session: uuid.UUID | None,
    sender: str = "+33611111111",
    seller: bool = False,
    sid: str | None = None,
    at: datetime | None = None,
) -> Inbound:
    return Inbound(
        message_sid=sid or f"SM{next(_sids):032x}",
        tenant_id=tenant,
        from_seller=seller,
        session_id=session,
        body=body,
        received_at=at or datetime(2026, 12, 7, 18, 0, tzinfo=UTC),
        contact=Contact(Channel.WHATSAPP, SELLER if seller else sender),
        route=ReplyRoute(SHOP, "AC" + "0" * 32),
    )


@pytest.fixture(scope="module")
async def service_dsn(admin_dsn: str) -> str:
    await reset_service_schema(admin_dsn, SERVICE)
    return await migrate_service(SERVICE, MIGRATIONS)


@pytest.fixture(scope="module")
async def pool(service_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    # Larger than a service's default so concurrency tests race real connections.
    pool = await create_pool(service_dsn, SERVICE, min_size=2, max_size=30)
    yield pool
    await pool.close()


@pytest.fixture
async def clean_tables(pool: asyncpg.Pool) -> None:
    await pool.execute("TRUNCATE reservations, items, sessions, processed_inbound, replies, events")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(pool: asyncpg.Pool, clock: ManualClock, clean_tables: None) -> CatalogStore:
    return CatalogStore(pool, clock, hold=HOLD, settings=SettingsBook(), default_max_per_client=2)


@pytest.fixture
def tenant() -> str:
    return f"shop-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def session_id() -> uuid.UUID:
    return uuid.uuid4()
