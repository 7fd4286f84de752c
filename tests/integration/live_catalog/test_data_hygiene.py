"""live_catalog's data hygiene on a real PostgreSQL: only known event subjects are stored, and
the ledger and sent replies are purged after their retention while pending replies stay."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import asyncpg
import pytest

from infra.retention import RetentionSettings, RetentionTask
from services.live_catalog import events
from services.live_catalog.store import ledger_purges
from tests.integration.data_hygiene import (
    assert_subject_accepted,
    insert_event,
    known_subjects,
    recorded_subjects,
)
from tests.integration.live_catalog.conftest import SERVICE
from tools.bench.claims_bench import seed_summary_session


async def test_events_table_rejects_an_unknown_subject(pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as raised:
        await insert_event(pool, "live_catalog.v1.item.stolen")
    assert raised.value.constraint_name == "events_subject_known"


async def test_every_subject_the_code_records_is_allowed(pool: asyncpg.Pool) -> None:
    subjects = recorded_subjects(SERVICE)
    assert {events.ITEM_POSTED, events.RESERVATION_HELD, events.SESSION_SUMMARIZED} <= subjects
    assert subjects == await known_subjects(pool)
    for subject in sorted(subjects):
        await assert_subject_accepted(pool, subject)


async def test_retention_purges_old_ledger_rows_and_sent_replies_only(
    pool: asyncpg.Pool, clean_tables: None
) -> None:
    await pool.execute(
        "INSERT INTO processed_inbound (message_sid, tenant_id, outcome, processed_at)"
        " VALUES ('SMold', 't', 'Claim', now() - interval '40 days'),"
        " ('SMnew', 't', 'Claim', now())"
    )
    await pool.execute(
        "INSERT INTO replies (tenant_id, idempotency_key, sender, recipient_channel,"
        " recipient_value, account_sid, body, correlation_id, enqueued_at) VALUES"
        " ('t', 'sent-old', 's', 'whatsapp', '+1', 'AC', 'b', '', now() - interval '40 days'),"
        " ('t', 'sent-new', 's', 'whatsapp', '+1', 'AC', 'b', '', now()),"
        " ('t', 'pending', 's', 'whatsapp', '+1', 'AC', 'b', '', NULL)"
    )
    settings = RetentionSettings(interval_s=3600, batch_size=10, events_max_age=None)
    task = RetentionTask.from_settings(pool, settings, ledger_purges(timedelta(days=30)))
    assert await task.run_once() == {"processed_inbound": 1, "replies": 1}
    assert await pool.fetchval("SELECT array_agg(message_sid) FROM processed_inbound") == ["SMnew"]
    keys = await pool.fetchval(
        "SELECT array_agg(idempotency_key ORDER BY idempotency_key) FROM replies"
    )
    assert keys == ["pending", "sent-new"]


async def test_a_summary_of_500_items_and_5000_reservations_is_built_within_2_seconds(
    store, pool: asyncpg.Pool, clock
) -> None:
    tenant, session = "big-shop", uuid.uuid4()
    await seed_summary_session(pool, tenant, session, clock.now)
    started = time.perf_counter()
    summarized = await store.summarize_session(
        tenant, session, started_at=clock.now, closed_at=clock.now, content_sid="", correlation=""
    )
    elapsed = time.perf_counter() - started
    assert summarized is not None
    assert (len(summarized.totals.items), summarized.buyer_summaries) == (500, 2000)
    assert elapsed < 2.0, f"summary took {elapsed:.2f} s"
