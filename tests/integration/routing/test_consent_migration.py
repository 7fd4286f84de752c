"""The migration to consent per person keeps every opt-out recorded before it: they stay per
channel, effective exactly as they were, and the person's own START still lifts them."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from infra.db import create_pool, migrate_service
from services.routing import store
from services.routing.domain import (
    Channel,
    ConsentChange,
    ConsentOutcome,
    ConsentSource,
    ConsentState,
    Contact,
)
from tests.integration.routing.conftest import MIGRATIONS, SERVICE
from tools.stack import reset_service_schema

SCOPE_MIGRATION = "003_consent_scope.sql"
WHATSAPP = Contact("shop-1", Channel.WHATSAPP, "+33611111111")
SMS = Contact("shop-1", Channel.SMS, WHATSAPP.address)
T0 = datetime(2026, 2, 5, 12, 0, tzinfo=UTC)


async def test_opt_outs_recorded_per_channel_stay_effective(admin_dsn: str, tmp_path: Path) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if path.name < SCOPE_MIGRATION:
            shutil.copy(path, before)
    await reset_service_schema(admin_dsn, SERVICE)
    dsn = await migrate_service(SERVICE, before)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": SERVICE})
    try:
        await conn.execute(
            """
            INSERT INTO opt_outs (tenant_id, channel, address, opted_out_at, source, keyword,
                                  actor)
            VALUES ('shop-1', 'whatsapp', $1, $2, 'keyword', 'STOP', 'routing')
            """,
            WHATSAPP.address,
            T0,
        )
        await conn.execute(
            """
            INSERT INTO consent_log (tenant_id, channel, address, state, outcome, effective_at,
                                     source, keyword, actor)
            VALUES ('shop-1', 'whatsapp', $1, 'opted_out', 'changed', $2, 'keyword', 'STOP',
                    'routing')
            """,
            WHATSAPP.address,
            T0,
        )
    finally:
        await conn.close()

    await migrate_service(SERVICE, MIGRATIONS)
    pool = await create_pool(dsn, SERVICE, min_size=1, max_size=2)
    try:
        # Still opted out on WhatsApp, and only there, as when it was recorded.
        assert await store.consent_statuses(pool, [WHATSAPP, SMS]) == [
            store.ConsentStatus(T0, None),
            store.ConsentStatus(None, None),
        ]
        assert await pool.fetchval("SELECT scope FROM opt_outs") == "channel"
        assert await pool.fetchval("SELECT scope FROM consent_log") == "channel"
        # The person's START, on any phone channel, lifts it.
        start = ConsentChange(
            SMS, ConsentState.OPTED_IN, T0.replace(hour=13), ConsentSource.KEYWORD, "routing"
        )
        async with pool.acquire() as conn, conn.transaction():
            assert await store.apply_consent(conn, start) is ConsentOutcome.CHANGED
        assert (await store.consent_status(pool, WHATSAPP)).opted_out_at is None
    finally:
        await pool.close()
        await reset_service_schema(admin_dsn, SERVICE)
