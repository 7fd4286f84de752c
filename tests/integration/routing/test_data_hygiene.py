"""routing's data hygiene on a real PostgreSQL: only known event subjects are stored, the hot
queries run on indexes at a realistic size, and the processed-inbound ledger and published
events are purged past their retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from infra.retention import RetentionSettings, RetentionTask
from services.routing import consent, inbound, store
from services.routing.domain import (
    PERSON_KEY,
    Channel,
    ConsentChange,
    ConsentScope,
    ConsentSource,
    ConsentState,
    Contact,
)
from tests.integration.data_hygiene import (
    assert_subject_accepted,
    assert_uses_index,
    explain,
    insert_event,
    known_subjects,
    process_with_fast_retention,
    recorded_subjects,
    wait_until_zero,
)
from tests.integration.routing.conftest import SERVICE, TABLES
from tools.dev_keys import DevKeys

TENANTS = 1_000
LEDGER_ROWS = 50_000
CONTACTS = 40_000
OPT_OUTS = 20_000
BIG_TABLES = ("processed_inbound", "opt_outs", "last_inbound", "consent_log")
NOW = datetime.now(UTC)


async def test_events_table_rejects_an_unknown_subject(pool: asyncpg.Pool) -> None:
    assert await known_subjects(pool)
    with pytest.raises(asyncpg.CheckViolationError) as raised:
        await insert_event(pool, "routing.v1.message.lost")
    assert raised.value.constraint_name == "events_subject_known"


async def test_every_subject_the_code_records_is_allowed(pool: asyncpg.Pool) -> None:
    subjects = recorded_subjects(SERVICE)
    assert {inbound.MESSAGE_ROUTED, consent.OPT_OUT_RECORDED} <= subjects
    assert subjects <= await known_subjects(pool)
    for subject in sorted(subjects):
        await assert_subject_accepted(pool, subject)


def sid(n: int) -> str:
    """The MessageSid the fixture gave row `n`."""
    return f"SM{n:032x}"


@pytest.fixture(scope="module")
async def loaded(pool: asyncpg.Pool) -> asyncpg.Pool:
    """30 days of inbound traffic (50k ledger rows) from 40k contacts of 1k shops, 20k of them
    opted out (5k from one big shop, `shop-big`), and their consent history; statistics up to
    date."""
    await pool.execute(f"TRUNCATE {TABLES}")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO processed_inbound (message_sid, tenant_id, outcome, sender_role,
                decision, stream_sequence, received_at, processed_at)
            SELECT 'SM' || lpad(to_hex(g), 32, '0'), 'shop-' || (g % $2), 'routed', 'client',
                   'conversation', g, t, t + interval '20 milliseconds'
            FROM generate_series(1, $1) g,
                 LATERAL (SELECT $3::timestamptz - (($1 - g) * interval '52 seconds') AS t) m
            """,
            LEDGER_ROWS,
            TENANTS,
            NOW,
        )
        await conn.execute(
            """
            INSERT INTO last_inbound (tenant_id, channel, address, last_inbound_at, message_sid)
            SELECT 'shop-' || (g % $2), 'whatsapp', '+336' || lpad(g::text, 8, '0'),
                   $3::timestamptz - make_interval(mins => g % 43200), 'SM' || md5(g::text)
            FROM generate_series(1, $1) g
            """,
            CONTACTS,
            TENANTS,
            NOW,
        )
        await conn.execute(
            """
            INSERT INTO opt_outs (tenant_id, channel, address, scope, opted_out_at, source,
                                  keyword, actor)
            SELECT CASE WHEN g <= $1 / 4 THEN 'shop-big' ELSE 'shop-' || (g % $2) END,
                   'whatsapp', '+336' || lpad(g::text, 8, '0'),
                   CASE WHEN g % 2 = 0 THEN 'person' ELSE 'channel' END,
                   $3::timestamptz - make_interval(mins => g), 'keyword', 'STOP', 'contact'
            FROM generate_series(1, $1) g
            """,
            OPT_OUTS,
            TENANTS,
            NOW,
        )
        await conn.execute(
            """
            INSERT INTO consent_log (tenant_id, channel, address, scope, state, outcome,
                                     effective_at, source, keyword, actor)
            SELECT 'shop-' || (g % $2), CASE WHEN g % 3 = 0 THEN 'sms' ELSE 'whatsapp' END,
                   '+336' || lpad(g::text, 8, '0'),
                   CASE WHEN g % 2 = 0 THEN 'person' ELSE 'channel' END,
                   'opted_out', 'changed', $3::timestamptz - make_interval(mins => g),
                   'keyword', 'STOP', 'contact'
            FROM generate_series(1, $1) g
            """,
            OPT_OUTS,
            TENANTS,
            NOW,
        )
    await pool.execute("ANALYZE processed_inbound, last_inbound, opt_outs, consent_log")
    return pool


async def test_ledger_lookup_by_message_sid_uses_the_primary_key(loaded: asyncpg.Pool) -> None:
    plan = await explain(loaded, store._PROCESSED_AMONG, [sid(31_337), sid(7)])
    assert_uses_index(plan, "processed_inbound_pkey", big_tables=BIG_TABLES)


async def test_ledger_insert_checks_the_message_sid_on_the_primary_key(
    loaded: asyncpg.Pool,
) -> None:
    plan = await explain(
        loaded,
        store._CLAIM_INBOUND_MANY,
        [sid(LEDGER_ROWS + 1), sid(LEDGER_ROWS + 2)],
        ["routed", "unroutable"],
        [LEDGER_ROWS + 1, LEDGER_ROWS + 2],
        [NOW, NOW],
        ["shop-7", None],
        ["client", None],
        ["live_signal", None],
        ["0190f7f2-0000-7000-8000-000000000001", None],
    )
    assert_uses_index(plan, "processed_inbound_pkey", big_tables=BIG_TABLES)


async def test_check_opt_out_and_last_inbound_probe_the_primary_keys(
    loaded: asyncpg.Pool,
) -> None:
    for address in ("+33600000042", "+33699999999"):  # opted out / never seen
        plan = await explain(
            loaded, store._CONSENT_STATUS, "shop-42", "whatsapp", address, PERSON_KEY
        )
        assert_uses_index(plan, "opt_outs_pkey", big_tables=BIG_TABLES)
        assert_uses_index(plan, "last_inbound_pkey", big_tables=BIG_TABLES)


@pytest.mark.parametrize("checks", [1, 200, 1000])
async def test_batch_consent_check_probes_the_primary_keys(
    loaded: asyncpg.Pool, checks: int
) -> None:
    # Half opted out, half never seen, over many shops: what the outbox asks per claimed batch.
    numbers = [n * 37 % (2 * OPT_OUTS) + 1 for n in range(checks)]
    plan = await explain(
        loaded,
        store._CONSENT_STATUSES,
        [f"shop-{n % TENANTS}" for n in numbers],
        ["whatsapp"] * checks,
        [f"+336{n:08d}" for n in numbers],
        [PERSON_KEY] * checks,
    )
    assert_uses_index(plan, "opt_outs_pkey", big_tables=BIG_TABLES)
    assert_uses_index(plan, "last_inbound_pkey", big_tables=BIG_TABLES)


async def test_last_inbound_upsert_uses_its_primary_key(loaded: asyncpg.Pool) -> None:
    plan = await explain(
        loaded,
        store._RECORD_LAST_INBOUND_MANY,
        ["shop-42", "shop-43"],
        ["whatsapp", "whatsapp"],
        ["+33600000042", "+33600000043"],
        [NOW, NOW],
        [sid(9), sid(10)],
    )
    assert_uses_index(plan, "last_inbound_pkey", big_tables=BIG_TABLES)


@pytest.mark.parametrize("scope", list(ConsentScope))
async def test_consent_history_lookup_uses_the_address_index(
    loaded: asyncpg.Pool, scope: ConsentScope
) -> None:
    contact = Contact("shop-42", Channel.WHATSAPP, "+33600000042")
    every, person_wide = ConsentChange(
        contact, ConsentState.OPTED_IN, NOW, ConsentSource.KEYWORD, "routing", tenant_scope=scope
    ).ordering_channels
    plan = await explain(
        loaded, store._NEWEST_CONSENT, contact.tenant_id, contact.address, every, person_wide
    )
    assert_uses_index(plan, "consent_log_address_idx", big_tables=BIG_TABLES)


# Paging matters for a shop with thousands of opt-outs: the first page and one further on.
@pytest.mark.parametrize("after", [None, (NOW - timedelta(minutes=2_000), 2_000)])
async def test_list_opt_outs_pages_on_the_tenant_recent_index(
    loaded: asyncpg.Pool, after: tuple[datetime, int] | None
) -> None:
    opted_out_at, row_id = after or (None, None)
    plan = await explain(loaded, store._LIST_OPT_OUTS, "shop-big", opted_out_at, row_id, 51)
    assert_uses_index(plan, "opt_outs_tenant_recent_idx", big_tables=BIG_TABLES)


async def test_ledger_purge_finds_old_rows_by_the_processed_at_index(
    loaded: asyncpg.Pool,
) -> None:
    # The steady state: an hourly run finds the hour that just went past 30 days.
    plan = await explain(loaded, store.DELETE_OLD_LEDGER, timedelta(days=30), 1000)
    assert_uses_index(plan, "processed_inbound_processed_at_idx", big_tables=BIG_TABLES)
    assert_uses_index(plan, "processed_inbound_pkey", big_tables=BIG_TABLES)


async def test_retention_purges_the_old_ledger_and_published_events(pool: asyncpg.Pool) -> None:
    await pool.execute(f"TRUNCATE {TABLES}")
    await pool.execute(
        """
        INSERT INTO processed_inbound (message_sid, outcome, stream_sequence, received_at,
                                       processed_at)
        SELECT 'SM' || lpad(to_hex(g), 32, '0'), 'unroutable', g, at, at
        FROM generate_series(1, 60) g,
             LATERAL (SELECT now() - CASE WHEN g <= 45 THEN interval '31 days'
                                          ELSE interval '29 days' END AS at) a
        """
    )
    await pool.execute(
        "INSERT INTO events (subject, aggregate_id, payload, published_at) VALUES"
        " ($1, 'old', '', now() - interval '8 days'), ($1, 'unpublished', '', NULL)",
        inbound.MESSAGE_ROUTED,
    )
    settings = RetentionSettings(interval_s=3600, batch_size=10, events_max_age=timedelta(7))
    task = RetentionTask.from_settings(pool, settings, store.ledger_purges(timedelta(days=30)))

    assert await task.run_once() == {"events": 1, "processed_inbound": 45}
    assert await pool.fetchval("SELECT count(*) FROM processed_inbound") == 15
    assert await pool.fetchval("SELECT min(stream_sequence) FROM processed_inbound") == 46
    assert await pool.fetchval("SELECT aggregate_id FROM events") == "unpublished"


def test_a_ledger_kept_forever_has_no_purge() -> None:
    assert store.ledger_purges(None) == []


async def test_the_process_purges_the_old_ledger_and_published_events(
    admin_dsn: str, nats_url: str, token_keys: DevKeys
) -> None:
    env = {"ROUTING_LEDGER_RETENTION_DAYS": "8", "ROUTING_CONSUMER_ENABLED": "false"}
    async with process_with_fast_retention(admin_dsn, nats_url, SERVICE, env) as conn:
        await conn.execute(
            """
            INSERT INTO processed_inbound (message_sid, outcome, stream_sequence, received_at,
                                           processed_at)
            SELECT 'SM' || lpad(age::text, 32, '0'), 'unroutable', age, at, at
            FROM (VALUES (9), (7)) AS a(age),
                 LATERAL (SELECT now() - make_interval(days => age) AS at) m
            """
        )
        await conn.execute(
            "INSERT INTO events (subject, aggregate_id, payload, published_at)"
            " VALUES ($1, 'old', '', now() - interval '3 days')",
            inbound.MESSAGE_ROUTED,
        )
        await wait_until_zero(
            conn, "SELECT count(*) FROM processed_inbound WHERE stream_sequence = 9"
        )
        await wait_until_zero(conn, "SELECT count(*) FROM events")
        assert await conn.fetchval("SELECT count(*) FROM processed_inbound") == 1
