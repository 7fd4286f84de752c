"""All SQL of the outbox.

- `OutboxStore`, the sending side: enqueue, claim under a lease, renew and release leases,
  write send results in batches (status, attempts and events in one statement), the look-ups
  reconciliation needs, the backlog, and the purge of finished messages.
- `OutboxAdminStore`, the operator side: one message with its attempts, dead letters
  (keyset-paginated), Redrive and Discard (audited).
- The statements status callbacks run in their transaction (`status_callbacks.py` decides).

Every change records its event in the same transaction.
Wake-ups: an enqueue that is due now NOTIFYs `outbox_due` at commit; workers LISTEN on it.
Direct dispatch (`enqueue_and_claim`): an enqueue may instead insert the messages a sending
pipeline of the same process has room for already claimed by that pipeline's worker, in the
state `claim_due_messages` leaves a claimed row in (no NOTIFY, no second row version); should
the process die before the pipeline takes them, their lease runs out and any worker claims
them as it claims every expired lease (a `lease_expired` attempt, reconciled before a resend).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import asyncpg

from infra.db import Connection
from infra.events import record_event
from infra.retention import Purge, batched_delete
from services.outbox import events
from services.outbox.domain import (
    Channel,
    ClaimedMessage,
    DeadReason,
    MessageKind,
    MessageStatus,
    NewMessage,
    Resolution,
    StoredAttempt,
)

DUE_CHANNEL = "outbox_due"


# Many messages in one statement, in the order given (callers sort them, so that two concurrent
# batches take their unique-key locks in the same order). A message whose `take` flag is set
# and that is due now is inserted already claimed by worker $15 for $16 seconds, exactly as
# `claim_due_messages` would leave it (direct dispatch: the caller hands it to its pipeline
# after the commit); any other message due now NOTIFYs `outbox_due` at commit. A message's
# retry budget starts when it is first due (`greatest`: its not_before, or now).
_ENQUEUE_MANY = """
WITH inserted AS (
    INSERT INTO messages (
        tenant_id, idempotency_key, correlation_id, kind, account_sid, sender,
        recipient_channel, recipient, body, content_sid, content_variables,
        next_attempt_at, budget_started_at, max_attempts, traceparent,
        status, lease_owner, lease_expires_at, attempt_started_at)
    SELECT m.tenant_id, m.idempotency_key, m.correlation_id, m.kind, m.account_sid, m.sender,
        m.recipient_channel, m.recipient, m.body, m.content_sid, m.content_variables,
        CASE WHEN m.claim THEN now() + make_interval(secs => $16::float8)
            ELSE coalesce(m.not_before, now()) END,
        greatest(now(), m.not_before), m.max_attempts, m.traceparent,
        CASE WHEN m.claim THEN 'sending' ELSE 'pending' END,
        CASE WHEN m.claim THEN $15::text END,
        CASE WHEN m.claim THEN now() + make_interval(secs => $16::float8) END,
        CASE WHEN m.claim THEN now() END
    FROM (
        SELECT u.*, coalesce(u.take AND coalesce(u.not_before, now()) <= now(), false) AS claim
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
                    $12::timestamptz[], $13::int[], $14::text[], $17::bool[]) WITH ORDINALITY
            AS u(tenant_id, idempotency_key, correlation_id, kind, account_sid, sender,
                 recipient_channel, recipient, body, content_sid, content_variables,
                 not_before, max_attempts, traceparent, take, n)
    ) m
    ORDER BY m.n
    ON CONFLICT ON CONSTRAINT messages_tenant_idempotency_key_key DO NOTHING
    RETURNING id, tenant_id, idempotency_key, status, next_attempt_at, correlation_id, kind,
        account_sid, sender, recipient_channel, recipient, body, content_sid, content_variables,
        attempt_count, max_attempts, reconcile_failures, budget_started_at, attempt_started_at,
        reconcile_since, traceparent
)
SELECT *, 'pending' AS prior_status,
       CASE WHEN status = 'pending' AND next_attempt_at <= now()
           THEN pg_notify('outbox_due', '') END AS notified
FROM inserted
"""

_EXISTING_MANY = """
SELECT m.id, m.tenant_id, m.idempotency_key
FROM unnest($1::text[], $2::text[]) AS k(tenant_id, idempotency_key)
JOIN messages m ON m.tenant_id = k.tenant_id AND m.idempotency_key = k.idempotency_key
"""

# Pick due rows (skipping those another worker holds), take the lease, and record a lease that
# ran out as an attempt to reconcile: one statement in a function, with the planner settings
# that keep it on the due index (migrations/006_claim_function.sql), so one round trip.
_CLAIM = "SELECT * FROM claim_due_messages($1, $2, $3, $4, $5)"

# Leases renewed, and claims released unsent on shutdown (due again at once, for any worker):
# migration 007's functions, for its planner setting.
_RENEW = "SELECT id FROM renew_leases($1, $2, $3) AS id"
_RELEASE = "SELECT release_messages($1, $2)"

# Results of many claims in one statement (migration 007's function). A row is written only
# while this worker still holds its lease -- except an acceptance by Twilio, which is recorded
# even after a lost lease (it is the truth; whoever holds the message now will find it sent)
# unless that Twilio SID is already someone's.
_RESOLVE = "SELECT ids FROM record_resolutions($1, $2, $3, $4)"

# Reconciliation may adopt a Twilio message only when no other message to the same person
# from the same sender could be mid-send with its SID not yet recorded: a plain send in
# flight, or an earlier-claimed (smaller id) reconciliation that may go on to resend.
_RECONCILE_CHECK = """
SELECT EXISTS (
    SELECT 1 FROM messages o
    WHERE o.recipient = $1 AND o.sender = $2 AND o.id <> $3
      AND o.status = 'sending' AND o.lease_expires_at > now()
      AND (o.reconcile_since IS NULL OR o.id < $3)
) AS blocked,
array(SELECT twilio_sid FROM messages WHERE twilio_sid = ANY ($4::text[])) AS taken
"""

# A reconciliation that found nothing and goes on to send looks like a plain send from now on.
# The ownership rule is a CASE, as in migration 007's functions (see there why).
_START_RESEND = """
UPDATE messages SET reconcile_since = NULL
WHERE id = $1 AND CASE WHEN status = 'sending' AND lease_owner = $2 THEN true ELSE false END
RETURNING id
"""

# One count per status so each uses its partial index, never a scan of every message sent.
_BACKLOG = """
SELECT (SELECT count(*) FROM messages WHERE status = 'pending') AS pending,
    (SELECT count(*) FROM messages WHERE status = 'sending') AS sending,
    (SELECT count(*) FROM messages WHERE status = 'dead') AS dead
"""

# Due and not yet claimed: the work waiting for a sender (messages_due_idx).
_DUE_BACKLOG = """
SELECT count(*) AS depth,
    coalesce(extract(epoch FROM now() - min(next_attempt_at)), 0)::float8 AS oldest_age_s
FROM messages WHERE status = 'pending' AND next_attempt_at <= now()
"""

# Retention of finished messages (see infra/retention.py for the batching); their attempts go
# with them (attempts_message_id_fkey ON DELETE CASCADE). Never pending/sending (still owed a
# send) nor dead (an operator's to redrive or discard). An Enqueue repeating the idempotency key
# of a purged message creates a new message: callers retry within minutes, not a month later.
DELETE_FINISHED_MESSAGES = batched_delete(
    "messages",
    "id",
    "updated_at",
    where="status IN ('sent', 'delivered', 'read', 'failed', 'undelivered', 'blocked',"
    " 'discarded')",
)


def finished_message_purges(max_age: timedelta | None) -> list[Purge]:
    """The finished messages' purge for `infra.retention.RetentionTask` (none: kept forever)."""
    return [] if max_age is None else [Purge("messages", DELETE_FINISHED_MESSAGES, max_age)]


_KINDS = {kind.value: kind for kind in MessageKind}
_CHANNELS = {channel.value: channel for channel in Channel}


def _claimed(row: asyncpg.Record) -> ClaimedMessage:
    return ClaimedMessage(
        id=row["id"],
        tenant_id=row["tenant_id"],
        correlation_id=row["correlation_id"],
        kind=_KINDS[row["kind"]],
        account_sid=row["account_sid"],
        sender=row["sender"],
        channel=_CHANNELS[row["recipient_channel"]],
        recipient=row["recipient"],
        body=row["body"],
        content_sid=row["content_sid"],
        content_variables=row["content_variables"],
        attempt_count=row["attempt_count"],
        max_attempts=row["max_attempts"],
        reconcile_failures=row["reconcile_failures"],
        budget_started_at=row["budget_started_at"],
        claimed_at=row["attempt_started_at"],
        reconcile_since=row["reconcile_since"],
        traceparent=row["traceparent"],
        lease_expired=row["prior_status"] == "sending",
    )


def _pair_key(sender: str, tenant_id: str) -> str:
    return f"{sender} {tenant_id}"


class OutboxStore:
    """The sender side's statements over one pool (connections run as the outbox role)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def enqueue(self, message: NewMessage) -> tuple[uuid.UUID, bool]:
        """(message id, created). The same (tenant, idempotency key) returns the first id."""
        [stored] = await self.enqueue_many([message])
        return stored

    async def enqueue_many(self, messages: Sequence[NewMessage]) -> list[tuple[uuid.UUID, bool]]:
        """`enqueue` of each message, in order, in one statement: (message id, created). A
        key repeated within `messages` is created once; its repeats return the same id."""
        stored, _ = await self.enqueue_and_claim(messages)
        return stored

    async def enqueue_and_claim(
        self,
        messages: Sequence[NewMessage],
        take: Sequence[bool] = (),
        worker_id: str | None = None,
        lease_s: float | None = None,
    ) -> tuple[list[tuple[uuid.UUID, bool]], list[ClaimedMessage]]:
        """`enqueue_many`, where each message whose `take` flag is set (in the order of
        `messages`), that is due now and newly created, is inserted already claimed by
        `worker_id` for `lease_s` (no NOTIFY): (message id, created) of each message, and
        those claimed, for the caller to hand to its pipeline (direct dispatch).

        One round trip when no key was stored before: the INSERT commits on its own, and only
        the keys that conflicted are looked up after it."""
        if not messages:
            return [], []
        flags = list(take) or [False] * len(messages)
        if len(flags) != len(messages):
            raise ValueError("one take flag per message")
        keys = [(m.tenant_id, m.idempotency_key) for m in messages]
        order = sorted(range(len(messages)), key=keys.__getitem__)
        rows = [messages[i] for i in order]
        async with self.pool.acquire() as conn:
            inserted = await conn.fetch(
                _ENQUEUE_MANY,
                [m.tenant_id for m in rows],
                [m.idempotency_key for m in rows],
                [m.correlation_id for m in rows],
                [m.kind.value for m in rows],
                [m.account_sid for m in rows],
                [m.sender for m in rows],
                [m.recipient_channel.value for m in rows],
                [m.recipient for m in rows],
                [m.body for m in rows],
                [m.content_sid for m in rows],
                [m.content_variables for m in rows],
                [m.not_before for m in rows],
                [m.max_attempts for m in rows],
                [m.traceparent for m in rows],
                worker_id,
                lease_s,
                [flags[i] for i in order],
            )
            created = {(r["tenant_id"], r["idempotency_key"]): r["id"] for r in inserted}
            missing = sorted(set(keys) - created.keys())
            existing: dict[tuple[str, str], uuid.UUID] = {}
            if missing:
                found = await conn.fetch(
                    _EXISTING_MANY, [k[0] for k in missing], [k[1] for k in missing]
                )
                existing = {(r["tenant_id"], r["idempotency_key"]): r["id"] for r in found}
        results: list[tuple[uuid.UUID, bool]] = []
        first_of: set[tuple[str, str]] = set()
        for key in keys:
            if key in created:
                results.append((created[key], key not in first_of))
                first_of.add(key)
            elif key in existing:
                results.append((existing[key], False))
            else:  # the conflicting row was deleted meanwhile; vanishingly rare
                raise asyncpg.SerializationError("idempotency key conflict, retry")
        claimed = [_claimed(r) for r in inserted if r["status"] == "sending"]
        return results, claimed

    async def claim_due_messages(
        self,
        worker_id: str,
        limit: int,
        lease_s: float,
        saturated: Sequence[tuple[str, str]] = (),
        held: Sequence[uuid.UUID] = (),
    ) -> list[ClaimedMessage]:
        """Claim up to `limit` due messages for `lease_s` seconds, oldest due first, skipping
        rows other workers hold, the (sender, tenant) pairs this worker has enough of, and the
        `held` messages this worker has claimed and not yet settled."""
        pairs = [_pair_key(sender, tenant) for sender, tenant in saturated]
        rows = await self.pool.fetch(_CLAIM, worker_id, limit, float(lease_s), pairs, list(held))
        return [_claimed(row) for row in rows]

    async def renew_leases(
        self, worker_id: str, ids: Sequence[uuid.UUID], lease_s: float
    ) -> set[uuid.UUID]:
        """Extend the leases still held; returns those ids (the others were lost)."""
        if not ids:
            return set()
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_RENEW, list(ids), worker_id, float(lease_s))
        return {row["id"] for row in rows}

    async def release(self, worker_id: str, ids: Sequence[uuid.UUID]) -> None:
        if ids:
            async with self.pool.acquire() as conn:
                await conn.execute(_RELEASE, list(ids), worker_id)

    async def record_resolutions(
        self, worker_id: str, resolutions: Sequence[Resolution]
    ) -> set[uuid.UUID]:
        """Write many results in one statement (one transaction); returns the ids written."""
        if not resolutions:
            return set()
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_RESOLVE, worker_id, *_resolution_rows(resolutions))
        assert row is not None
        return set(row["ids"])

    async def reconcile_check(
        self, message: ClaimedMessage, candidate_sids: Sequence[str]
    ) -> tuple[bool, frozenset[str]]:
        """(blocked by a sibling possibly mid-send, the candidate SIDs already recorded)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                _RECONCILE_CHECK, message.recipient, message.sender, message.id, candidate_sids
            )
        assert row is not None
        return row["blocked"], frozenset(row["taken"])

    async def backlog_counts(self) -> dict[str, int]:
        """Messages per status among those still in the outbox's hands or an operator's."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_BACKLOG)
        assert row is not None
        return dict(row)

    async def due_backlog(self) -> tuple[int, float]:
        """Messages due and not yet claimed, and how long the oldest has been due (s)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_DUE_BACKLOG)
        assert row is not None
        return row["depth"], row["oldest_age_s"]

    async def start_resend(self, worker_id: str, message_id: uuid.UUID) -> bool:
        """Mark a reconciled message as a plain send; False if the lease was lost."""
        async with self.pool.acquire() as conn:
            return await conn.fetchval(_START_RESEND, message_id, worker_id) is not None


_Rows = Sequence[tuple[object, ...]]


def _resolution_rows(
    resolutions: Sequence[Resolution],
) -> tuple[_Rows, _Rows, _Rows]:
    """The three arrays `_RESOLVE` unnests (migration 004's row types): messages, attempts,
    events."""
    messages = [
        (
            r.message_id,
            r.status.value,
            r.attempt_increment,
            r.reconcile_failure_increment,
            r.next_attempt_at,
            r.reconcile_since,
            r.twilio_sid,
            r.twilio_status,
            r.sent_at,
            r.dead_reason.value if r.dead_reason else None,
            r.error_code,
            r.error_message,
        )
        for r in resolutions
    ]
    attempts = [
        (
            r.message_id,
            a.outcome.value,
            a.started_at,
            a.finished_at,
            a.http_status,
            a.error_code,
            a.error_message,
            a.twilio_sid,
        )
        for r in resolutions
        for a in r.attempts
    ]
    events = [
        (r.message_id, e.subject, r.tenant_id, e.payload, e.traceparent)
        for r in resolutions
        for e in r.events
    ]
    return messages, attempts, events


# --- the operator side --------------------------------------------------------------------

_MESSAGE_COLUMNS = """
    id, tenant_id, idempotency_key, correlation_id, kind, account_sid, sender,
    recipient_channel, recipient, body, content_sid, content_variables, status, twilio_status,
    twilio_sid, attempt_count, max_attempts, dead_reason, last_error_code, last_error_message,
    created_at, updated_at, next_attempt_at, sent_at, dead_at
"""

_GET = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = $1 AND tenant_id = $2"
_ATTEMPTS = """
SELECT outcome, started_at, finished_at, http_status, error_code, error_message, twilio_sid,
    worker_id
FROM attempts WHERE message_id = $1 ORDER BY finished_at, id
"""
_DEAD_LETTERS = f"""
SELECT {_MESSAGE_COLUMNS} FROM messages
WHERE tenant_id = $1 AND status = 'dead'
  AND ($2::timestamptz IS NULL OR (dead_at, id) < ($2, $3::uuid))
  AND ($4::text IS NULL OR dead_reason = $4)
  AND ($5::text IS NULL OR sender = $5)
  AND ($6::timestamptz IS NULL OR dead_at >= $6)
ORDER BY dead_at DESC, id DESC
LIMIT $7
"""
_REDRIVE = """
WITH target AS (
    SELECT id, dead_reason FROM messages
    WHERE id = ANY ($1::uuid[]) AND tenant_id = $2 AND status = 'dead'
    FOR UPDATE
)
UPDATE messages m SET
    status = 'pending', attempt_count = 0, reconcile_failures = 0, max_attempts = $3,
    budget_started_at = now(), dead_reason = NULL, dead_at = NULL, next_attempt_at = now(),
    updated_at = now()
FROM target
WHERE m.id = target.id
RETURNING m.id, target.dead_reason AS previous_reason
"""
_DISCARD = """
WITH target AS (
    SELECT id, dead_reason FROM messages
    WHERE id = ANY ($1::uuid[]) AND tenant_id = $2 AND status = 'dead'
    FOR UPDATE
)
UPDATE messages m SET status = 'discarded', updated_at = now()
FROM target
WHERE m.id = target.id
RETURNING m.id, target.dead_reason AS previous_reason
"""


class OutboxAdminStore:
    """The operator side's statements over one pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get_message(
        self, tenant_id: str, message_id: uuid.UUID
    ) -> tuple[asyncpg.Record, list[StoredAttempt]] | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_GET, message_id, tenant_id)
            if row is None:
                return None
            attempts = await conn.fetch(_ATTEMPTS, message_id)
        return row, [StoredAttempt(**dict(a)) for a in attempts]

    async def list_dead_letters(
        self,
        tenant_id: str,
        *,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
        reason: DeadReason | None,
        sender: str | None,
        dead_after: datetime | None,
    ) -> list[asyncpg.Record]:
        after_at, after_id = after if after else (None, None)
        async with self._pool.acquire() as conn:
            return await conn.fetch(
                _DEAD_LETTERS,
                tenant_id,
                after_at,
                after_id,
                reason.value if reason else None,
                sender,
                dead_after,
                limit,
            )

    async def redrive(
        self,
        tenant_id: str,
        message_ids: Sequence[uuid.UUID],
        *,
        actor: str,
        max_attempts: int,
        now: datetime,
    ) -> list[uuid.UUID]:
        """Dead letters back to pending with a fresh retry budget (its time starts now, its
        attempts are counted again); returns those moved.
        A message whose last outcome is unknown keeps `reconcile_since`: Twilio is asked
        before it is sent again."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_REDRIVE, list(message_ids), tenant_id, max_attempts)
            for row in rows:
                event = events.message_redriven(
                    message_id=row["id"],
                    tenant_id=tenant_id,
                    previous_reason=DeadReason(row["previous_reason"]),
                    actor=actor,
                    at=now,
                )
                await record_event(
                    conn,
                    subject=events.REDRIVEN_SUBJECT,
                    message=event,
                    aggregate_id=str(row["id"]),
                    tenant_id=tenant_id,
                    actor=actor,
                )
            if rows:
                await conn.execute("SELECT pg_notify('outbox_due', '')")
        return [row["id"] for row in rows]

    async def discard(
        self,
        tenant_id: str,
        message_ids: Sequence[uuid.UUID],
        *,
        actor: str,
        reason: str,
        now: datetime,
    ) -> list[uuid.UUID]:
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_DISCARD, list(message_ids), tenant_id)
            for row in rows:
                event = events.message_discarded(
                    message_id=row["id"],
                    tenant_id=tenant_id,
                    previous_reason=DeadReason(row["previous_reason"]),
                    actor=actor,
                    reason=reason,
                    at=now,
                )
                await record_event(
                    conn,
                    subject=events.DISCARDED_SUBJECT,
                    message=event,
                    aggregate_id=str(row["id"]),
                    tenant_id=tenant_id,
                    actor=actor,
                )
        return [row["id"] for row in rows]


# --- status callbacks: the statements `status_callbacks.StatusCallbacks` runs in its transaction

_BY_SID = """
SELECT id, tenant_id, account_sid, status, twilio_status FROM messages
WHERE twilio_sid = $1 FOR UPDATE
"""
_ADVANCE = """
UPDATE messages SET status = $2, twilio_status = $3, updated_at = now(),
    last_error_code = coalesce($4, last_error_code),
    last_error_message = coalesce($5, last_error_message)
WHERE id = $1
"""
_TWILIO_STATUS_ONLY = "UPDATE messages SET twilio_status = $2, updated_at = now() WHERE id = $1"


async def lock_message_by_twilio_sid(conn: Connection, twilio_sid: str) -> asyncpg.Record | None:
    """The message Twilio knows by this SID, locked until the transaction ends (the row lock
    orders concurrent callbacks for one message)."""
    return await conn.fetchrow(_BY_SID, twilio_sid)


async def advance_status(
    conn: Connection,
    message_id: uuid.UUID,
    status: MessageStatus,
    twilio_status: str,
    error_code: int | None,
    error_message: str | None,
) -> None:
    await conn.execute(_ADVANCE, message_id, status.value, twilio_status, error_code, error_message)


async def record_twilio_status(conn: Connection, message_id: uuid.UUID, twilio_status: str) -> None:
    """Twilio's own status only: the message's status stays where it is."""
    await conn.execute(_TWILIO_STATUS_ONLY, message_id, twilio_status)
