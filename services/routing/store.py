"""All of routing's SQL (asyncpg). Tables are in `migrations/` (consent's
scope: `003_consent_scope.sql`).

Functions take a connection when they must run inside the caller's transaction (the unit of
work of one inbound message), and a pool when they stand alone (read-only API lookups).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from infra.db import Connection
from infra.retention import Purge, batched_delete
from services.routing.domain import (
    Channel,
    ConsentChange,
    ConsentOutcome,
    ConsentSource,
    ConsentState,
    Contact,
    check_opt_in_may_lift,
)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    message_sid: str
    outcome: str  # 'routed' | 'unroutable'
    stream_sequence: int
    received_at: datetime
    tenant_id: str | None = None
    sender_role: str | None = None
    decision: str | None = None
    live_session_id: str | None = None


@dataclass(frozen=True, slots=True)
class OptOutRecord:
    id: int
    contact: Contact
    opted_out_at: datetime
    source: ConsentSource
    message_sid: str
    keyword: str
    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class ConsentStatus:
    opted_out_at: datetime | None
    last_inbound_at: datetime | None


# The hot statements, as module constants so tests/integration/routing/test_data_hygiene.py
# checks the plans of exactly these (each on its index, at a realistic table size).
_PROCESSED_AMONG = "SELECT message_sid FROM processed_inbound WHERE message_sid = ANY($1::text[])"

_CLAIM_INBOUND_MANY = """
INSERT INTO processed_inbound (message_sid, outcome, stream_sequence, received_at,
                               tenant_id, sender_role, decision, live_session_id)
SELECT e.message_sid, e.outcome, e.stream_sequence, e.received_at, e.tenant_id,
       e.sender_role, e.decision, e.live_session_id
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::text[], $6::text[],
            $7::text[], $8::text[]) WITH ORDINALITY
    AS e(message_sid, outcome, stream_sequence, received_at, tenant_id, sender_role, decision,
         live_session_id, n)
ORDER BY e.n
ON CONFLICT ON CONSTRAINT processed_inbound_pkey DO NOTHING
RETURNING message_sid
"""

_RECORD_LAST_INBOUND_MANY = """
INSERT INTO last_inbound AS l (tenant_id, channel, address, last_inbound_at, message_sid)
SELECT c.tenant_id, c.channel, c.address, c.last_inbound_at, c.message_sid
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[]) WITH ORDINALITY
    AS c(tenant_id, channel, address, last_inbound_at, message_sid, n)
ORDER BY c.n
ON CONFLICT ON CONSTRAINT last_inbound_pkey DO UPDATE
    SET last_inbound_at = excluded.last_inbound_at, message_sid = excluded.message_sid
    WHERE l.last_inbound_at < excluded.last_inbound_at
"""

# The newest applied expression among those ordering a change (`ConsentChange.ordering_channels`).
_NEWEST_CONSENT = """
SELECT max(effective_at) FROM consent_log
WHERE tenant_id = $1 AND address = $2 AND outcome <> 'stale'
  AND (channel = ANY($3::text[]) OR (scope = 'person' AND channel = ANY($4::text[])))
"""

_OPT_OUT_SOURCES = """
SELECT source FROM opt_outs
WHERE tenant_id = $1 AND address = $2 AND scope_key = ANY($3::text[])
"""

# CheckOptOut and the WhatsApp window: primary-key probes in one round trip. A contact is opted
# out by its channel's row or, on a phone channel, by the person-wide one (`$4`: NULL on
# Messenger); the earliest one answers.
_CONSENT_STATUS = """
SELECT
    (SELECT min(opted_out_at) FROM opt_outs
      WHERE tenant_id = $1 AND address = $3 AND scope_key IN ($2, $4)) AS opted_out_at,
    (SELECT last_inbound_at FROM last_inbound
      WHERE tenant_id = $1 AND channel = $2 AND address = $3) AS last_inbound_at
"""

# CheckOptOuts: the same probes for every check of a batch, in one statement. Correlated
# subqueries keep each probe a primary-key look-up whatever the batch size or the statistics
# (a join could turn into a scan of both tables); the ordinality keeps the request's order.
_CONSENT_STATUSES = """
SELECT
    (SELECT min(o.opted_out_at) FROM opt_outs o
      WHERE o.tenant_id = c.tenant_id AND o.address = c.address
        AND o.scope_key IN (c.channel, c.person_key))
        AS opted_out_at,
    (SELECT l.last_inbound_at FROM last_inbound l
      WHERE l.tenant_id = c.tenant_id AND l.channel = c.channel AND l.address = c.address)
        AS last_inbound_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY
    AS c(tenant_id, channel, address, person_key, n)
ORDER BY c.n
"""

_LIST_OPT_OUTS = """
SELECT id, tenant_id, channel, address, opted_out_at, source, message_sid, keyword,
       actor, reason
FROM opt_outs
WHERE tenant_id = $1
  AND ($2::timestamptz IS NULL OR (opted_out_at, id) < ($2::timestamptz, $3::bigint))
ORDER BY opted_out_at DESC, id DESC
LIMIT $4
"""

# Retention of the ledger (see infra/retention.py for the batching). A MessageSid re-delivered
# after its row is gone would be processed again; the INBOUND stream keeps messages 7 days and
# Twilio retries a webhook within minutes, so a ledger kept longer than both loses nothing.
DELETE_OLD_LEDGER = batched_delete("processed_inbound", "message_sid", "processed_at")


def ledger_purges(max_age: timedelta | None) -> list[Purge]:
    """The ledger's purge for `infra.retention.RetentionTask` (none when kept forever)."""
    return [] if max_age is None else [Purge("processed_inbound", DELETE_OLD_LEDGER, max_age)]


async def processed_among(conn: asyncpg.Pool | Connection, message_sids: Sequence[str]) -> set[str]:
    """Which of these MessageSids are already in the ledger."""
    rows = await conn.fetch(_PROCESSED_AMONG, list(message_sids))
    return {row["message_sid"] for row in rows}


async def claim_inbound_many(conn: Connection, entries: Sequence[LedgerEntry]) -> set[str]:
    """Insert the ledger rows, in MessageSid order, in one statement: the MessageSids claimed
    now (the others were processed already). A concurrent transaction claiming one of them
    waits on its row until the first one ends."""
    rows = sorted(entries, key=lambda e: e.message_sid)
    claimed = await conn.fetch(
        _CLAIM_INBOUND_MANY,
        [e.message_sid for e in rows],
        [e.outcome for e in rows],
        [e.stream_sequence for e in rows],
        [e.received_at for e in rows],
        [e.tenant_id for e in rows],
        [e.sender_role for e in rows],
        [e.decision for e in rows],
        [e.live_session_id for e in rows],
    )
    return {row["message_sid"] for row in claimed}


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message's contribution to a contact's last inbound time."""

    contact: Contact
    at: datetime
    message_sid: str


async def record_last_inbound_many(conn: Connection, inbound: Sequence[Inbound]) -> None:
    """Keep each contact's newest receive time (messages may be processed out of order), in
    one statement: the newest of `inbound` per contact, in key order."""
    newest: dict[tuple[str, str, str], Inbound] = {}
    for one in inbound:
        key = (one.contact.tenant_id, one.contact.channel.value, one.contact.address)
        if key not in newest or newest[key].at < one.at:
            newest[key] = one
    if not newest:
        return
    keys = sorted(newest)
    await conn.execute(
        _RECORD_LAST_INBOUND_MANY,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [newest[k].at for k in keys],
        [newest[k].message_sid for k in keys],
    )


async def apply_consent(conn: Connection, change: ConsentChange) -> ConsentOutcome:
    """Apply one consent expression in the caller's transaction and log it.

    Changes for one person are serialised by a transaction-scoped advisory lock on
    `Contact.lock_key` (there may be no row to lock yet), and an expression older than the
    newest one already applied among those that order it is STALE. An opt-in that may not lift
    every opt-out it would delete raises `ConsentLockedError` (checked under the lock, so a STOP
    committed meanwhile is seen)."""
    contact = change.contact
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "\x1f".join(contact.lock_key)
    )
    if change.state is ConsentState.OPTED_IN:
        for source in await conn.fetch(
            _OPT_OUT_SOURCES, contact.tenant_id, contact.address, list(change.lifted_keys)
        ):
            check_opt_in_may_lift(ConsentSource(source["source"]), change)
    every, person_wide = change.ordering_channels
    newest = await conn.fetchval(
        _NEWEST_CONSENT, contact.tenant_id, contact.address, list(every), list(person_wide)
    )
    if newest is not None and change.effective_at < newest:
        outcome = ConsentOutcome.STALE
    elif change.state is ConsentState.OPTED_OUT:
        inserted = await conn.fetchval(
            """
            INSERT INTO opt_outs (tenant_id, channel, address, scope, opted_out_at, source,
                                  message_sid, keyword, actor, reason)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            ON CONFLICT ON CONSTRAINT opt_outs_pkey DO NOTHING
            RETURNING 1
            """,
            contact.tenant_id,
            contact.channel.value,
            contact.address,
            change.scope.value,
            change.effective_at,
            change.source.value,
            change.message_sid,
            change.keyword,
            change.actor,
            change.reason,
        )
        outcome = ConsentOutcome.CHANGED if inserted else ConsentOutcome.UNCHANGED
    else:
        deleted = await conn.fetch(
            """
            DELETE FROM opt_outs
            WHERE tenant_id = $1 AND address = $2 AND scope_key = ANY($3::text[])
            RETURNING 1
            """,
            contact.tenant_id,
            contact.address,
            list(change.lifted_keys),
        )
        outcome = ConsentOutcome.CHANGED if deleted else ConsentOutcome.UNCHANGED
    await conn.execute(
        """
        INSERT INTO consent_log (tenant_id, channel, address, scope, state, outcome,
                                 effective_at, source, message_sid, keyword, actor, reason)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        """,
        contact.tenant_id,
        contact.channel.value,
        contact.address,
        change.scope.value,
        change.state.value,
        outcome.value,
        change.effective_at,
        change.source.value,
        change.message_sid,
        change.keyword,
        change.actor,
        change.reason,
    )
    return outcome


async def consent_status(pool: asyncpg.Pool | Connection, contact: Contact) -> ConsentStatus:
    """The outbox's hot path: primary-key probes in one round trip."""
    row = await pool.fetchrow(
        _CONSENT_STATUS,
        contact.tenant_id,
        contact.channel.value,
        contact.address,
        contact.person_key,
    )
    assert row is not None
    return ConsentStatus(row["opted_out_at"], row["last_inbound_at"])


async def consent_statuses(
    pool: asyncpg.Pool | Connection, contacts: Sequence[Contact]
) -> list[ConsentStatus]:
    """`consent_status` of every contact, in order, in one round trip and one statement."""
    if not contacts:
        return []
    rows = await pool.fetch(
        _CONSENT_STATUSES,
        [c.tenant_id for c in contacts],
        [c.channel.value for c in contacts],
        [c.address for c in contacts],
        [c.person_key for c in contacts],
    )
    return [ConsentStatus(row["opted_out_at"], row["last_inbound_at"]) for row in rows]


async def list_opt_outs(
    pool: asyncpg.Pool,
    tenant_id: str,
    *,
    limit: int,
    after: tuple[datetime, int] | None = None,
) -> list[OptOutRecord]:
    """A tenant's opt-outs, newest first, keyset-paginated after (opted_out_at, id)."""
    rows = await pool.fetch(
        _LIST_OPT_OUTS,
        tenant_id,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [
        OptOutRecord(
            id=row["id"],
            contact=Contact(row["tenant_id"], Channel(row["channel"]), row["address"]),
            opted_out_at=row["opted_out_at"],
            source=ConsentSource(row["source"]),
            message_sid=row["message_sid"],
            keyword=row["keyword"],
            actor=row["actor"],
            reason=row["reason"],
        )
        for row in rows
    ]


async def opted_out_at(conn: Connection, contact: Contact) -> datetime | None:
    return (await consent_status(conn, contact)).opted_out_at


async def record_failed_inbound(
    conn: Connection,
    *,
    stream: str,
    stream_sequence: int,
    message_sid: str,
    reason: str,
    detail: str,
    deliveries: int,
    payload: bytes,
) -> bool:
    """False when this stream message was already recorded (a repeated delivery)."""
    row = await conn.fetchval(
        """
        INSERT INTO failed_inbound
            (stream, stream_sequence, message_sid, reason, detail, deliveries, payload)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT ON CONSTRAINT failed_inbound_stream_sequence_key DO NOTHING
        RETURNING 1
        """,
        stream,
        stream_sequence,
        message_sid,
        reason,
        detail[:1000],
        deliveries,
        payload,
    )
    return row is not None
