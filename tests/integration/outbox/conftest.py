"""One stack per test module: the Twilio sandbox and routing as real processes; each module
starts the outbox processes it needs through `OutboxStack.start_outbox`. Modules that test the
store and the pipeline in-process use `pool` (a fresh outbox schema per module) and `store`
(emptied for each test) instead."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from infra.db import create_pool, migrate_service
from services.outbox.store import OutboxStore
from tests.integration.outbox.stack import OutboxStack
from tools.dev_keys import DevKeys
from tools.stack import reset_service_schema

MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "outbox" / "migrations"


@pytest.fixture(scope="module")
async def stack(admin_dsn: str, nats_url: str, token_keys: DevKeys) -> AsyncIterator[OutboxStack]:
    running = OutboxStack(admin_dsn, nats_url, token_keys)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def pool(admin_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    await reset_service_schema(admin_dsn, "outbox")
    dsn = await migrate_service("outbox", MIGRATIONS)
    pool = await create_pool(dsn, "outbox", min_size=2, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture
async def store(pool: asyncpg.Pool) -> OutboxStore:
    await pool.execute("TRUNCATE messages, attempts, events")
    return OutboxStore(pool)
