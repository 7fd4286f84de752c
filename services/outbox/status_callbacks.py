"""Twilio status callbacks driving a sent message forward (the use case; `consumer.py` feeds it
the gateway's `StatusReceived` events, `store.py` runs its statements).

Forward only (see `domain.can_apply_callback`): sent -> delivered -> read, or failed /
undelivered straight after sent. Duplicates, late and out-of-order callbacks change nothing,
except that Twilio's own status is kept at the furthest one reported. A callback counts only
from the account the message was sent with. Every move records its event in the same
transaction.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import asyncpg

from infra.events import record_event
from services.outbox import events, store
from services.outbox.domain import (
    MessageStatus,
    can_apply_callback,
    newer_twilio_status,
    status_from_twilio,
)


class CallbackEffect(StrEnum):
    # No message has this SID (yet: the send's result may not be written).
    UNKNOWN_SID = "unknown_sid"
    # The callback names another Twilio account than the one the message was sent with.
    WRONG_ACCOUNT = "wrong_account"
    ADVANCED = "advanced"
    # A duplicate, late or out-of-order callback: the status stays where it is.
    IGNORED = "ignored"


class StatusCallbacks:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def apply(
        self,
        twilio_sid: str,
        twilio_status: str,
        *,
        account_sid: str,
        error_code: int | None,
        error_message: str | None,
        now: datetime,
    ) -> CallbackEffect:
        """Move the message forward if the callback allows it and comes from the account the
        message was sent with; the row lock orders concurrent callbacks for one message."""
        reported = twilio_status.strip().lower()
        target = status_from_twilio(reported)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await store.lock_message_by_twilio_sid(conn, twilio_sid)
            if row is None:
                return CallbackEffect.UNKNOWN_SID
            if row["account_sid"] != account_sid:
                return CallbackEffect.WRONG_ACCOUNT
            current = MessageStatus(row["status"])
            if target is None or not can_apply_callback(current, target):
                if target is current and newer_twilio_status(row["twilio_status"], reported):
                    await store.record_twilio_status(conn, row["id"], reported)
                return CallbackEffect.IGNORED
            await store.advance_status(conn, row["id"], target, reported, error_code, error_message)
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
