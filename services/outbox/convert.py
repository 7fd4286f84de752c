"""Proto <-> domain conversions of the outbox, in one place: the enum mappings, timestamps and
addresses the events and the API share, and the API's `Message` built from a stored row."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.common.v1 import address_pb2
from snapsell.outbox.v1 import outbox_pb2

from services.outbox.domain import (
    AttemptOutcome,
    Channel,
    DeadReason,
    MessageKind,
    MessageStatus,
    StoredAttempt,
)

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
    return Timestamp(**timestamp_fields(moment))


def timestamp_fields(moment: datetime) -> dict[str, int]:
    """`timestamp(moment)` as constructor fields: a nested message given as a dict is built in
    place instead of being built apart and copied in."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return {"seconds": delta.days * 86_400 + delta.seconds, "nanos": delta.microseconds * 1000}


def address(channel: Channel, value: str) -> address_pb2.Address:
    return address_pb2.Address(channel=CHANNEL_TO_PROTO[channel], value=value)


def message_proto(row: asyncpg.Record, attempts: Sequence[StoredAttempt]) -> outbox_pb2.Message:
    """The API's view of a stored message (a row of `store.OutboxAdminStore`), with its attempts."""
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
