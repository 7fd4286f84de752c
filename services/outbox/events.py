"""The outbox contract's messages built from domain values: the events this service records
(`outbox.v1.<entity>.<past_tense>`), the API's `Message`, and the enum mappings."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.common.v1 import address_pb2
from snapsell.outbox.v1 import events_pb2, outbox_pb2

from services.outbox.domain import (
    AttemptOutcome,
    Channel,
    DeadReason,
    MessageKind,
    MessageStatus,
)
from services.outbox.records import ClaimedMessage, PendingEvent

if TYPE_CHECKING:
    import asyncpg

    from services.outbox.admin_store import StoredAttempt

SENT_SUBJECT = "outbox.v1.message.sent"
BLOCKED_OPTOUT_SUBJECT = "outbox.v1.message.blocked_optout"
DEAD_LETTERED_SUBJECT = "outbox.v1.message.dead_lettered"
STATUS_CHANGED_SUBJECT = "outbox.v1.message.status_changed"
REDRIVEN_SUBJECT = "outbox.v1.message.redriven"
DISCARDED_SUBJECT = "outbox.v1.message.discarded"
RECIPIENT_UNSUBSCRIBED_SUBJECT = "outbox.v1.recipient.unsubscribed"

CHANNEL_TO_PROTO = {
    Channel.SMS: address_pb2.CHANNEL_SMS,
    Channel.WHATSAPP: address_pb2.CHANNEL_WHATSAPP,
    Channel.MESSENGER: address_pb2.CHANNEL_MESSENGER,
}

CHANNEL_FROM_PROTO = {value: key for key, value in CHANNEL_TO_PROTO.items()}
KIND_TO_PROTO = {
    MessageKind.CONVERSATIONAL: outbox_pb2.MESSAGE_KIND_CONVERSATIONAL,
    MessageKind.COMPLIANCE: outbox_pb2.MESSAGE_KIND_COMPLIANCE,
}
KIND_FROM_PROTO = {value: key for key, value in KIND_TO_PROTO.items()}
STATUS_TO_PROTO = {
    MessageStatus.PENDING: outbox_pb2.MESSAGE_STATUS_PENDING,
    MessageStatus.SENDING: outbox_pb2.MESSAGE_STATUS_SENDING,
    MessageStatus.SENT: outbox_pb2.MESSAGE_STATUS_SENT,
    MessageStatus.DELIVERED: outbox_pb2.MESSAGE_STATUS_DELIVERED,
    MessageStatus.READ: outbox_pb2.MESSAGE_STATUS_READ,
    MessageStatus.FAILED: outbox_pb2.MESSAGE_STATUS_FAILED,
    MessageStatus.UNDELIVERED: outbox_pb2.MESSAGE_STATUS_UNDELIVERED,
    MessageStatus.BLOCKED: outbox_pb2.MESSAGE_STATUS_BLOCKED,
    MessageStatus.DEAD: outbox_pb2.MESSAGE_STATUS_DEAD,
    MessageStatus.DISCARDED: outbox_pb2.MESSAGE_STATUS_DISCARDED,
}
DEAD_REASON_TO_PROTO = {
    DeadReason.OUTSIDE_SESSION_WINDOW: outbox_pb2.DEAD_REASON_OUTSIDE_SESSION_WINDOW,
    DeadReason.PERMANENT_ERROR: outbox_pb2.DEAD_REASON_PERMANENT_ERROR,
    DeadReason.ATTEMPTS_EXHAUSTED: outbox_pb2.DEAD_REASON_ATTEMPTS_EXHAUSTED,
    DeadReason.OUTCOME_UNKNOWN: outbox_pb2.DEAD_REASON_OUTCOME_UNKNOWN,
}
DEAD_REASON_FROM_PROTO = {value: key for key, value in DEAD_REASON_TO_PROTO.items()}
ATTEMPT_OUTCOME_TO_PROTO = {
    AttemptOutcome.ACCEPTED: outbox_pb2.ATTEMPT_OUTCOME_ACCEPTED,
    AttemptOutcome.RETRYABLE_ERROR: outbox_pb2.ATTEMPT_OUTCOME_RETRYABLE_ERROR,
    AttemptOutcome.PERMANENT_ERROR: outbox_pb2.ATTEMPT_OUTCOME_PERMANENT_ERROR,
    AttemptOutcome.OUTCOME_UNKNOWN: outbox_pb2.ATTEMPT_OUTCOME_OUTCOME_UNKNOWN,
    AttemptOutcome.LEASE_EXPIRED: outbox_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED,
    AttemptOutcome.RECONCILED_FOUND: outbox_pb2.ATTEMPT_OUTCOME_RECONCILED_FOUND,
    AttemptOutcome.RECONCILED_NOT_FOUND: outbox_pb2.ATTEMPT_OUTCOME_RECONCILED_NOT_FOUND,
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(moment: datetime) -> Timestamp:
    # What Timestamp.FromDatetime computes (naive means UTC), in a quarter of its time: one
    # runs for every event of every send.
    return Timestamp(**_timestamp_fields(moment))


def _timestamp_fields(moment: datetime) -> dict[str, int]:
    """`timestamp(moment)` as constructor fields: a nested message given as a dict is built in
    place instead of being built apart and copied in."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return {"seconds": delta.days * 86_400 + delta.seconds, "nanos": delta.microseconds * 1000}


def address(channel: Channel, value: str) -> address_pb2.Address:
    return address_pb2.Address(channel=CHANNEL_TO_PROTO[channel], value=value)


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
        sent_at=_timestamp_fields(sent_at),  # type: ignore[arg-type]  # a dict: see above
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


def message_proto(row: asyncpg.Record, attempts: Sequence[StoredAttempt]) -> outbox_pb2.Message:
    """The API's view of a stored message (a row of `admin_store`), with its attempts."""
    channel = Channel(row["recipient_channel"])
    message = outbox_pb2.Message(
        message_id=str(row["id"]),
        tenant_id=row["tenant_id"],
        idempotency_key=row["idempotency_key"],
        correlation_id=row["correlation_id"],
        kind=KIND_TO_PROTO[MessageKind(row["kind"])],
        account_sid=row["account_sid"],
        sender=row["sender"],
        recipient=address(channel, row["recipient"]),
        status=STATUS_TO_PROTO[MessageStatus(row["status"])],
        twilio_status=row["twilio_status"] or "",
        twilio_sid=row["twilio_sid"] or "",
        attempt_count=row["attempt_count"],
        max_attempts=row["max_attempts"],
        last_error_code=row["last_error_code"] or 0,
        last_error_message=row["last_error_message"] or "",
        created_at=timestamp(row["created_at"]),
        updated_at=timestamp(row["updated_at"]),
        next_attempt_at=timestamp(row["next_attempt_at"]),
    )
    if row["content_sid"] is not None:
        variables = json.loads(row["content_variables"]) if row["content_variables"] else {}
        message.template.content_sid = row["content_sid"]
        message.template.variables.update(variables)
    else:
        message.body = row["body"]
    if row["dead_reason"]:
        message.dead_reason = DEAD_REASON_TO_PROTO[DeadReason(row["dead_reason"])]
    for name in ("sent_at", "dead_at"):
        if row[name] is not None:
            getattr(message, name).CopyFrom(timestamp(row[name]))
    for number, attempt in enumerate(attempts, start=1):
        message.attempts.append(
            outbox_pb2.Attempt(
                number=number,
                outcome=ATTEMPT_OUTCOME_TO_PROTO[AttemptOutcome(attempt.outcome)],
                started_at=timestamp(attempt.started_at),
                finished_at=timestamp(attempt.finished_at),
                http_status=attempt.http_status or 0,
                error_code=attempt.error_code or 0,
                error_message=attempt.error_message or "",
                twilio_sid=attempt.twilio_sid or "",
                worker_id=attempt.worker_id,
            )
        )
    return message
