"""The events this service records (`outbox.v1.<entity>.<past_tense>`), built from domain
values; the proto mappings they use are in `convert.py`."""

from __future__ import annotations

import uuid
from datetime import datetime

from google.protobuf.message import Message
from snapsell.outbox.v1 import events_pb2

from infra.convert import timestamp, timestamp_fields
from services.outbox.convert import (
    CHANNEL_TO_PROTO,
    DEAD_REASON_TO_PROTO,
    KIND_TO_PROTO,
    STATUS_TO_PROTO,
    address,
)
from services.outbox.domain import ClaimedMessage, DeadReason, MessageStatus, PendingEvent

SENT_SUBJECT = "outbox.v1.message.sent"
BLOCKED_OPTOUT_SUBJECT = "outbox.v1.message.blocked_optout"
DEAD_LETTERED_SUBJECT = "outbox.v1.message.dead_lettered"
STATUS_CHANGED_SUBJECT = "outbox.v1.message.status_changed"
REDRIVEN_SUBJECT = "outbox.v1.message.redriven"
DISCARDED_SUBJECT = "outbox.v1.message.discarded"
RECIPIENT_UNSUBSCRIBED_SUBJECT = "outbox.v1.recipient.unsubscribed"


def _event(subject: str, message: Message, traceparent: str | None) -> PendingEvent:
    return PendingEvent(subject, message.SerializeToString(), traceparent)


def message_sent(
    claimed: ClaimedMessage,
    *,
    twilio_sid: str,
    attempt_count: int,
    reconciled: bool,
    sent_at: datetime,
    traceparent: str | None,
) -> PendingEvent:
    event = events_pb2.MessageSent(
        message_id=str(claimed.id),
        tenant_id=claimed.tenant_id,
        correlation_id=claimed.correlation_id,
        kind=KIND_TO_PROTO[claimed.kind],
        sender=claimed.sender,
        # Nested messages given as dicts are built in place (the hot path of every send):
        # protobuf accepts them, its stubs type only the message classes.
        recipient={"channel": CHANNEL_TO_PROTO[claimed.channel], "value": claimed.recipient},  # type: ignore[arg-type]  # a dict: see above
        twilio_sid=twilio_sid,
        attempt_count=attempt_count,
        reconciled=reconciled,
        sent_at=timestamp_fields(sent_at),  # type: ignore[arg-type]  # a dict: see above
    )
    return _event(SENT_SUBJECT, event, traceparent)


def message_blocked_optout(
    claimed: ClaimedMessage,
    *,
    opted_out_since: datetime | None,
    blocked_at: datetime,
    traceparent: str | None,
) -> PendingEvent:
    event = events_pb2.MessageBlockedOptOut(
        message_id=str(claimed.id),
        tenant_id=claimed.tenant_id,
        correlation_id=claimed.correlation_id,
        sender=claimed.sender,
        recipient=address(claimed.channel, claimed.recipient),
        blocked_at=timestamp(blocked_at),
    )
    if opted_out_since is not None:
        event.opted_out_since.CopyFrom(timestamp(opted_out_since))
    return _event(BLOCKED_OPTOUT_SUBJECT, event, traceparent)


def message_dead_lettered(
    claimed: ClaimedMessage,
    *,
    reason: DeadReason,
    attempt_count: int,
    error_code: int | None,
    error_message: str | None,
    dead_at: datetime,
    traceparent: str | None,
) -> PendingEvent:
    event = events_pb2.MessageDeadLettered(
        message_id=str(claimed.id),
        tenant_id=claimed.tenant_id,
        correlation_id=claimed.correlation_id,
        sender=claimed.sender,
        recipient=address(claimed.channel, claimed.recipient),
        reason=DEAD_REASON_TO_PROTO[reason],
        attempt_count=attempt_count,
        last_error_code=error_code or 0,
        last_error_message=error_message or "",
        dead_at=timestamp(dead_at),
    )
    return _event(DEAD_LETTERED_SUBJECT, event, traceparent)


def recipient_unsubscribed(
    claimed: ClaimedMessage, *, error_code: int, occurred_at: datetime, traceparent: str | None
) -> PendingEvent:
    event = events_pb2.RecipientUnsubscribed(
        tenant_id=claimed.tenant_id,
        sender=claimed.sender,
        recipient=address(claimed.channel, claimed.recipient),
        message_id=str(claimed.id),
        twilio_error_code=error_code,
        occurred_at=timestamp(occurred_at),
    )
    return _event(RECIPIENT_UNSUBSCRIBED_SUBJECT, event, traceparent)


def message_status_changed(
    *,
    message_id: uuid.UUID,
    tenant_id: str,
    twilio_sid: str,
    previous: MessageStatus,
    current: MessageStatus,
    twilio_status: str,
    error_code: int | None,
    changed_at: datetime,
) -> events_pb2.MessageStatusChanged:
    return events_pb2.MessageStatusChanged(
        message_id=str(message_id),
        tenant_id=tenant_id,
        twilio_sid=twilio_sid,
        previous_status=STATUS_TO_PROTO[previous],
        status=STATUS_TO_PROTO[current],
        twilio_status=twilio_status,
        error_code=error_code or 0,
        changed_at=timestamp(changed_at),
    )


def message_redriven(
    *,
    message_id: uuid.UUID,
    tenant_id: str,
    previous_reason: DeadReason,
    actor: str,
    at: datetime,
) -> events_pb2.MessageRedriven:
    return events_pb2.MessageRedriven(
        message_id=str(message_id),
        tenant_id=tenant_id,
        previous_reason=DEAD_REASON_TO_PROTO[previous_reason],
        actor=actor,
        redriven_at=timestamp(at),
    )


def message_discarded(
    *,
    message_id: uuid.UUID,
    tenant_id: str,
    previous_reason: DeadReason,
    actor: str,
    reason: str,
    at: datetime,
) -> events_pb2.MessageDiscarded:
    return events_pb2.MessageDiscarded(
        message_id=str(message_id),
        tenant_id=tenant_id,
        previous_reason=DEAD_REASON_TO_PROTO[previous_reason],
        actor=actor,
        reason=reason,
        discarded_at=timestamp(at),
    )
