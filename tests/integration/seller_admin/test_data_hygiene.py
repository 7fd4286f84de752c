"""seller_admin's data hygiene on a real PostgreSQL: only known event subjects are stored, the
hot queries run on indexes at a realistic size, and old published events are purged."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import asyncpg
import pytest

from infra.retention import RetentionSettings, RetentionTask
from services.seller_admin import audit, store
from tests.integration.data_hygiene import (
    assert_process_purges_old_events,
    assert_subject_accepted,
    assert_uses_index,
    explain,
    insert_event,
    known_subjects,
    recorded_subjects,
)
from tests.integration.seller_admin.conftest import ACCOUNT_SID, SERVICE
from tools.dev_keys import DevKeys

TENANTS = 10_000
SELLERS_PER_TENANT = 5
BIG_TABLES = ("channels", "seller_phones")


async def test_events_table_rejects_an_unknown_subject(pool: asyncpg.Pool) -> None:
    assert await known_subjects(pool)  # the constraint is there
    with pytest.raises(asyncpg.CheckViolationError) as raised:
        await insert_event(pool, "seller_admin.v1.tenant.exploded")
    assert raised.value.constraint_name == "events_subject_known"


async def test_every_subject_the_code_records_is_allowed(pool: asyncpg.Pool) -> None:
    subjects = recorded_subjects(SERVICE)
    assert {audit.TENANT_CREATED, audit.SELLER_PHONE_REMOVED} <= subjects  # the scan works
    assert subjects <= await known_subjects(pool)
    for subject in sorted(subjects):
        await assert_subject_accepted(pool, subject)


@pytest.fixture(scope="module")
async def loaded(pool: asyncpg.Pool) -> asyncpg.Pool:
    """10k shops, each with a WhatsApp and an SMS number, half of them with a Messaging
    Service, and 5 seller phones each (50k); statistics up to date."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO tenants (tenant_id, display_name)"
            " SELECT 'shop-' || g, 'Shop ' || g FROM generate_series(1, $1) g",
            TENANTS,
        )
        for kind, prefix in (("whatsapp", "whatsapp:+1415"), ("sms", "+1628")):
            await conn.execute(
                "INSERT INTO channels (channel_id, tenant_id, kind, address, account_sid)"
                " SELECT gen_random_uuid(), 'shop-' || g, $2, $3 || lpad(g::text, 7, '0'), $4"
                " FROM generate_series(1, $1) g",
                TENANTS,
                kind,
                prefix,
                ACCOUNT_SID,
            )
        await conn.execute(
            "INSERT INTO channels"
            " (channel_id, tenant_id, kind, messaging_service_sid, account_sid)"
            " SELECT gen_random_uuid(), 'shop-' || g, 'messaging_service', 'MG' || md5(g::text),"
            " $2 FROM generate_series(1, $1, 2) g",
            TENANTS,
            ACCOUNT_SID,
        )
        await conn.execute(
            "INSERT INTO seller_phones (seller_phone_id, tenant_id, kind, address)"
            " SELECT gen_random_uuid(), 'shop-' || (g % $1 + 1), 'phone',"
            " '+336' || lpad(g::text, 8, '0') FROM generate_series(1, $2) g",
            TENANTS,
            TENANTS * SELLERS_PER_TENANT,
        )
    await pool.execute("ANALYZE tenants, channels, seller_phones")
    return pool


@pytest.mark.parametrize(
    ("messaging_service_sid", "recipient", "senders"),
    [
        # Shop 11's Messaging Service, which wins over the number match; one of its sellers.
        ("MG" + hashlib.md5(b"11").hexdigest(), "whatsapp:+14150000011", ["+33600010010"]),
        # Shop 42's WhatsApp number (no service); a client known by number and WhatsApp ID.
        ("", "whatsapp:+14150000042", ["+33799999999", "FR.ENT.abc42"]),
    ],
)
async def test_resolve_sender_runs_on_the_unique_indexes(
    loaded: asyncpg.Pool, messaging_service_sid: str, recipient: str, senders: list[str]
) -> None:
    plan = await explain(
        loaded, store._RESOLVE_SENDER, messaging_service_sid, recipient, ACCOUNT_SID, senders
    )
    for index in (
        "channels_messaging_service_sid_key",
        "channels_address_key",
        "seller_phones_tenant_address_key",
    ):
        assert_uses_index(plan, index, big_tables=BIG_TABLES)


@pytest.mark.parametrize("after", ["", "+33600020042"])
async def test_list_seller_phones_pages_on_the_tenant_address_index(
    loaded: asyncpg.Pool, after: str
) -> None:
    plan = await explain(loaded, store._LIST_SELLER_PHONES, "shop-43", after, 50)
    assert_uses_index(plan, "seller_phones_tenant_address_key", big_tables=BIG_TABLES)


async def test_retention_purges_published_events_older_than_the_window(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute("TRUNCATE events")
    await pool.execute(
        "INSERT INTO events (subject, aggregate_id, payload, created_at, published_at)"
        " SELECT $1, g::text, '', now() - interval '9 days', now() - interval '8 days'"
        " FROM generate_series(1, 25) g",
        audit.TENANT_CREATED,
    )
    await pool.execute(
        "INSERT INTO events (subject, aggregate_id, payload, created_at, published_at)"
        " VALUES ($1, 'recent', '', now(), now()), ($1, 'unpublished', '', now() - interval"
        " '9 days', NULL)",
        audit.TENANT_CREATED,
    )
    settings = RetentionSettings(interval_s=3600, batch_size=10, events_max_age=timedelta(7))
    task = RetentionTask.from_settings(pool, settings)

    assert await task.run_once() == {"events": 25}
    left = await pool.fetch("SELECT aggregate_id FROM events ORDER BY aggregate_id")
    assert [row["aggregate_id"] for row in left] == ["recent", "unpublished"]


async def test_the_process_purges_old_published_events(
    admin_dsn: str, nats_url: str, token_keys: DevKeys
) -> None:
    await assert_process_purges_old_events(admin_dsn, nats_url, SERVICE, audit.TENANT_CREATED)
