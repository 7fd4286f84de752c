"""All SQL of the outbox's read and operator side: one message with its attempts, dead
letters (keyset-paginated), Redrive and Discard (audited), and Twilio status callbacks driving
the forward-only state machine. Every change records its event in the same transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg

from infra.events import record_event
from services.outbox import events
from services.outbox.domain import (
    DeadReason,
    MessageStatus,
    can_apply_callback,
    newer_twilio_status,
    status_from_twilio,
)

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
    dead_reason = NULL, dead_at = NULL, next_attempt_at = now(), updated_at = now()
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


@dataclass(frozen=True, slots=True)
class StoredAttempt:
    outcome: str
    started_at: datetime
    finished_at: datetime
    http_status: int | None
    error_code: int | None
    error_message: str | None
    twilio_sid: str | None
    worker_id: str


class CallbackEffect(StrEnum):
    # No message has this SID (yet: the send's result may not be written).
    UNKNOWN_SID = "unknown_sid"
    # The callback names another Twilio account than the one the message was sent with.
    WRONG_ACCOUNT = "wrong_account"
    ADVANCED = "advanced"
    # A duplicate, late or out-of-order callback: the status stays where it is.
    IGNORED = "ignored"


class OutboxAdminStore:
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
        """Dead letters back to pending with a fresh attempt budget; returns those moved.
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
                )
        return [row["id"] for row in rows]

    async def apply_status_callback(
        self,
        twilio_sid: str,
        twilio_status: str,
        *,
        account_sid: str,
        error_code: int | None,
        error_message: str | None,
        now: datetime,
    ) -> CallbackEffect:
        """Move the message forward if the callback allows it (see domain.can_apply_callback)
        and comes from the account the message was sent with; the row lock orders concurrent
        callbacks for one message."""
        reported = twilio_status.strip().lower()
        target = status_from_twilio(reported)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_BY_SID, twilio_sid)
            if row is None:
                return CallbackEffect.UNKNOWN_SID
            if row["account_sid"] != account_sid:
                return CallbackEffect.WRONG_ACCOUNT
            current = MessageStatus(row["status"])
            if target is None or not can_apply_callback(current, target):
                if target is current and newer_twilio_status(row["twilio_status"], reported):
                    await conn.execute(_TWILIO_STATUS_ONLY, row["id"], reported)
                return CallbackEffect.IGNORED
            await conn.execute(
                _ADVANCE, row["id"], target.value, reported, error_code, error_message
            )
            event = events.message_status_changed(
                message_id=row["id"],
                tenant_id=row["tenant_id"],
                twilio_sid=twilio_sid,
                previous=current,
                current=target,
                twilio_status=reported,
                error_code=error_code,
                changed_at=now,
            )
            await record_event(
                conn,
                subject=events.STATUS_CHANGED_SUBJECT,
                message=event,
                aggregate_id=str(row["id"]),
                tenant_id=row["tenant_id"],
            )
        return CallbackEffect.ADVANCED
