"""Routing's SQL against a real PostgreSQL: the ledger, the consent ledger, the 24-hour window."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.routing import store
from services.routing.domain import (
    Channel,
    ConsentChange,
    ConsentLockedError,
    ConsentOutcome,
    ConsentScope,
    ConsentSource,
    ConsentState,
    Contact,
)

CONTACT = Contact("shop-1", Channel.WHATSAPP, "+33611111111")
SMS_CONTACT = Contact("shop-1", Channel.SMS, CONTACT.address)
T0 = datetime(2026, 2, 5, 12, 0, tzinfo=UTC)


def entry(sid: str) -> store.LedgerEntry:
    return store.LedgerEntry(sid, "routed", 1, T0, "shop-1", "client", "conversation")


def change(
    state: ConsentState,
    at: datetime,
    sid: str = "",
    *,
    contact: Contact = CONTACT,
    scope: ConsentScope = ConsentScope.PERSON,
) -> ConsentChange:
    return ConsentChange(
        contact, state, at, ConsentSource.KEYWORD, "routing", sid, "STOP", tenant_scope=scope
    )


async def apply(pool: asyncpg.Pool, consent: ConsentChange) -> ConsentOutcome:
    async with pool.acquire() as conn, conn.transaction():
        return await store.apply_consent(conn, consent)


async def test_a_message_sid_is_claimed_once(clean: asyncpg.Pool) -> None:
    async with clean.acquire() as conn:
        assert await store.claim_inbound_many(conn, [entry("SM1")]) == {"SM1"}
        assert await store.claim_inbound_many(conn, [entry("SM1"), entry("SM3")]) == {"SM3"}
    assert await store.processed_among(clean, ["SM1", "SM2", "SM3"]) == {"SM1", "SM3"}


async def test_a_concurrent_claim_waits_for_the_first_and_then_sees_a_duplicate(
    clean: asyncpg.Pool,
) -> None:
    first = await clean.acquire()
    second = await clean.acquire()
    try:
        tx1 = first.transaction()
        await tx1.start()
        assert await store.claim_inbound_many(first, [entry("SM-race")]) == {"SM-race"}
        tx2 = second.transaction()
        await tx2.start()
        waiting = asyncio.create_task(store.claim_inbound_many(second, [entry("SM-race")]))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # blocked on the first transaction's row
        await tx1.commit()
        assert await waiting == set()
        await tx2.rollback()
    finally:
        await clean.release(first)
        await clean.release(second)


async def test_a_rolled_back_claim_leaves_the_message_to_be_processed_again(
    clean: asyncpg.Pool,
) -> None:
    async with clean.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        assert await store.claim_inbound_many(conn, [entry("SM-crash")]) == {"SM-crash"}
        await tx.rollback()
        assert await store.claim_inbound_many(conn, [entry("SM-crash")]) == {"SM-crash"}


async def test_opt_out_is_recorded_once_and_opt_in_removes_it(clean: asyncpg.Pool) -> None:
    assert await apply(clean, change(ConsentState.OPTED_OUT, T0, "SM1")) is ConsentOutcome.CHANGED
    assert await apply(clean, change(ConsentState.OPTED_OUT, T0 + timedelta(seconds=1))) is (
        ConsentOutcome.UNCHANGED
    )
    status = await store.consent_status(clean, CONTACT)
    assert status.opted_out_at == T0
    assert await apply(clean, change(ConsentState.OPTED_IN, T0 + timedelta(seconds=2))) is (
        ConsentOutcome.CHANGED
    )
    assert (await store.consent_status(clean, CONTACT)).opted_out_at is None
    assert await clean.fetchval("SELECT count(*) FROM consent_log") == 3


async def test_an_older_keyword_processed_late_does_not_undo_a_newer_one(
    clean: asyncpg.Pool,
) -> None:
    # The person sent STOP at T0 then START at T0+5s; START happened to be processed first.
    assert await apply(clean, change(ConsentState.OPTED_IN, T0 + timedelta(seconds=5))) is (
        ConsentOutcome.UNCHANGED
    )
    assert await apply(clean, change(ConsentState.OPTED_OUT, T0)) is ConsentOutcome.STALE
    assert (await store.consent_status(clean, CONTACT)).opted_out_at is None
    outcomes = await clean.fetch("SELECT outcome FROM consent_log ORDER BY id")
    assert [row["outcome"] for row in outcomes] == ["unchanged", "stale"]


def replay(log: list[asyncpg.Record]) -> tuple[list[str], datetime | None]:
    """The outcomes the consent rules give the log's changes applied one after the other in
    the order they were written (the log's ids), and the opt-out time they leave."""
    opted_out_at: datetime | None = None
    newest: datetime | None = None
    outcomes = []
    for row in log:
        at = row["effective_at"]
        if newest is not None and at < newest:
            outcomes.append(ConsentOutcome.STALE.value)
            continue
        wants_out = row["state"] == ConsentState.OPTED_OUT.value
        changed = wants_out != (opted_out_at is not None)
        outcomes.append((ConsentOutcome.CHANGED if changed else ConsentOutcome.UNCHANGED).value)
        if changed:
            opted_out_at = at if wants_out else None
        newest = at
    return outcomes, opted_out_at


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "channels", [(CONTACT,), (CONTACT, SMS_CONTACT)], ids=["one-channel", "two-channels"]
)
async def test_concurrent_changes_for_one_contact_are_serialised(
    clean: asyncpg.Pool, seed: int, channels: tuple[Contact, ...]
) -> None:
    # STOP and START alternating one day apart, submitted at once in a shuffled order: each
    # change reads the newest applied one and the current opt-out before it writes, so without
    # the per-person lock two of them decide on the same stale reading. With two channels, a
    # STOP and a START each come from WhatsApp and from SMS in turn: one person, one lock.
    changes = [
        change(
            ConsentState.OPTED_OUT if i % 2 else ConsentState.OPTED_IN,
            T0 + timedelta(i),
            contact=channels[(i // 2) % len(channels)],
        )
        for i in range(40)
    ]
    random.Random(seed).shuffle(changes)
    returned = await asyncio.gather(*(apply(clean, c) for c in changes))

    log = await clean.fetch("SELECT state, outcome, effective_at FROM consent_log ORDER BY id")
    assert len(log) == len(changes)
    # Every outcome is the one a one-at-a-time application in the log's order gives, and so is
    # the state left.
    outcomes, opted_out_at = replay(log)
    assert [row["outcome"] for row in log] == outcomes
    for contact in channels:
        assert (await store.consent_status(clean, contact)).opted_out_at == opted_out_at
    by_time = {c.effective_at: outcome.value for c, outcome in zip(changes, returned, strict=True)}
    assert {row["effective_at"]: row["outcome"] for row in log} == by_time
    # Whatever the interleaving, the newest expression (the last day, an opt-out) decides.
    assert opted_out_at is not None


async def test_consent_is_per_tenant_and_per_person_across_phone_channels(
    clean: asyncpg.Pool,
) -> None:
    await apply(clean, change(ConsentState.OPTED_OUT, T0))
    other_tenant = Contact("shop-2", CONTACT.channel, CONTACT.address)
    assert (await store.consent_status(clean, other_tenant)).opted_out_at is None
    # The STOP on WhatsApp stops SMS to the same number, and is logged as person-wide.
    assert (await store.consent_status(clean, SMS_CONTACT)).opted_out_at == T0
    assert await store.consent_statuses(clean, [SMS_CONTACT, CONTACT, other_tenant]) == [
        store.ConsentStatus(T0, None),
        store.ConsentStatus(T0, None),
        store.ConsentStatus(None, None),
    ]
    assert await clean.fetchval("SELECT scope FROM consent_log") == "person"
    # A STOP on SMS changes nothing more: the number is opted out already.
    later = T0 + timedelta(seconds=1)
    assert await apply(clean, change(ConsentState.OPTED_OUT, later, contact=SMS_CONTACT)) is (
        ConsentOutcome.UNCHANGED
    )


async def test_a_start_on_sms_lifts_a_stop_sent_on_whatsapp(clean: asyncpg.Pool) -> None:
    await apply(clean, change(ConsentState.OPTED_OUT, T0))
    start = change(ConsentState.OPTED_IN, T0 + timedelta(seconds=1), contact=SMS_CONTACT)
    assert await apply(clean, start) is ConsentOutcome.CHANGED
    assert (await store.consent_status(clean, CONTACT)).opted_out_at is None
    assert (await store.consent_status(clean, SMS_CONTACT)).opted_out_at is None


async def test_a_start_on_sms_processed_late_does_not_undo_a_newer_stop_on_whatsapp(
    clean: asyncpg.Pool,
) -> None:
    await apply(clean, change(ConsentState.OPTED_OUT, T0 + timedelta(seconds=5)))
    start = change(ConsentState.OPTED_IN, T0, contact=SMS_CONTACT)
    assert await apply(clean, start) is ConsentOutcome.STALE
    assert (await store.consent_status(clean, SMS_CONTACT)).opted_out_at is not None


async def test_a_tenant_narrowed_to_the_channel_keeps_consent_per_channel(
    clean: asyncpg.Pool,
) -> None:
    narrow = ConsentScope.CHANNEL
    assert await apply(clean, change(ConsentState.OPTED_OUT, T0, scope=narrow)) is (
        ConsentOutcome.CHANGED
    )
    assert (await store.consent_status(clean, CONTACT)).opted_out_at == T0
    assert (await store.consent_status(clean, SMS_CONTACT)).opted_out_at is None
    # A START on SMS concerns SMS only: nothing to lift there, WhatsApp stays opted out.
    start = change(ConsentState.OPTED_IN, T0 + timedelta(1), contact=SMS_CONTACT, scope=narrow)
    assert await apply(clean, start) is ConsentOutcome.UNCHANGED
    assert (await store.consent_status(clean, CONTACT)).opted_out_at == T0
    # And a STOP on SMS older than that START is stale for SMS alone.
    stop = change(ConsentState.OPTED_OUT, T0, contact=SMS_CONTACT, scope=narrow)
    assert await apply(clean, stop) is ConsentOutcome.STALE
    scopes = await clean.fetch("SELECT DISTINCT scope FROM consent_log")
    assert [row["scope"] for row in scopes] == ["channel"]


async def test_an_operator_cannot_lift_a_persons_stop_from_another_channel(
    clean: asyncpg.Pool,
) -> None:
    await apply(clean, change(ConsentState.OPTED_OUT, T0, contact=SMS_CONTACT))
    operator = ConsentChange(
        CONTACT, ConsentState.OPTED_IN, T0 + timedelta(1), ConsentSource.OPERATOR, "alice"
    )
    with pytest.raises(ConsentLockedError):
        await apply(clean, operator)
    assert (await store.consent_status(clean, CONTACT)).opted_out_at == T0


async def test_messenger_consent_stays_per_channel(clean: asyncpg.Pool) -> None:
    # A Messenger id is no phone number: a person-scoped tenant's STOP there covers Messenger.
    messenger = Contact(CONTACT.tenant_id, Channel.MESSENGER, "+33611111111")
    await apply(clean, change(ConsentState.OPTED_OUT, T0, contact=messenger))
    assert (await store.consent_status(clean, messenger)).opted_out_at == T0
    assert (await store.consent_status(clean, CONTACT)).opted_out_at is None
    assert await clean.fetchval("SELECT scope FROM consent_log") == "channel"
    # And a person-wide STOP on WhatsApp does not reach Messenger.
    await apply(clean, change(ConsentState.OPTED_IN, T0 + timedelta(1), contact=messenger))
    await apply(clean, change(ConsentState.OPTED_OUT, T0 + timedelta(2)))
    assert (await store.consent_status(clean, messenger)).opted_out_at is None


async def test_last_inbound_keeps_the_newest_time(clean: asyncpg.Pool) -> None:
    async with clean.acquire() as conn:
        await store.record_last_inbound_many(
            conn, [store.Inbound(CONTACT, T0 + timedelta(minutes=5), "SM2")]
        )
        await store.record_last_inbound_many(conn, [store.Inbound(CONTACT, T0, "SM1")])
    assert (await store.consent_status(clean, CONTACT)).last_inbound_at == T0 + timedelta(minutes=5)


async def test_batch_statuses_answer_each_contact_in_the_order_asked(clean: asyncpg.Pool) -> None:
    await apply(clean, change(ConsentState.OPTED_OUT, T0))
    async with clean.acquire() as conn:
        await store.record_last_inbound_many(
            conn, [store.Inbound(CONTACT, T0 + timedelta(minutes=5), "SM1")]
        )
    other_tenant = Contact("shop-2", CONTACT.channel, CONTACT.address)
    other_channel = Contact(CONTACT.tenant_id, Channel.MESSENGER, CONTACT.address)
    asked = [other_tenant, CONTACT, other_channel, SMS_CONTACT]
    statuses = await store.consent_statuses(clean, asked)
    assert statuses == [await store.consent_status(clean, contact) for contact in asked]
    assert [s.opted_out_at is not None for s in statuses] == [False, True, False, True]
    assert statuses[1].last_inbound_at == T0 + timedelta(minutes=5)
    assert await store.consent_statuses(clean, []) == []


async def test_the_consent_check_uses_primary_key_lookups_only(clean: asyncpg.Pool) -> None:
    for table in ("opt_outs", "last_inbound"):
        extra = (
            "source, actor, opted_out_at" if table == "opt_outs" else "message_sid, last_inbound_at"
        )
        values = "'keyword', 'x', now()" if table == "opt_outs" else "'SM', now()"
        await clean.execute(
            f"INSERT INTO {table} (tenant_id, channel, address, {extra}) "
            f"SELECT 'shop-' || (i % 20), 'whatsapp', '+336' || i, {values} "
            "FROM generate_series(1, 5000) AS i"
        )
        await clean.execute(f"ANALYZE {table}")
    rows = await clean.fetch(
        """
        EXPLAIN (FORMAT TEXT)
        SELECT
            (SELECT opted_out_at FROM opt_outs
              WHERE tenant_id = 'shop-1' AND channel = 'whatsapp' AND address = '+3361'),
            (SELECT last_inbound_at FROM last_inbound
              WHERE tenant_id = 'shop-1' AND channel = 'whatsapp' AND address = '+3361')
        """
    )
    plan = "\n".join(row[0] for row in rows)
    assert "Index Scan using opt_outs_pkey" in plan
    assert "Index Scan using last_inbound_pkey" in plan
    assert "Seq Scan" not in plan


async def test_a_failed_stream_message_is_recorded_once(clean: asyncpg.Pool) -> None:
    async with clean.acquire() as conn:
        for _ in range(2):
            await store.record_failed_inbound(
                conn,
                stream="INBOUND",
                stream_sequence=7,
                message_sid="",
                reason="undecodable",
                detail="garbage",
                deliveries=1,
                payload=b"\xff",
            )
    assert await clean.fetchval("SELECT count(*) FROM failed_inbound") == 1
