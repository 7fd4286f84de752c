"""Proto <-> domain conversions of the outbox, in one place: the enum mappings and addresses the
events and the API share (built with `infra.convert`), and the API's `Message` built from a
stored row."""

from __future__ import annotations

import json
from collections.abc import Sequence

import asyncpg
from snapsell.common.v1 import address_pb2
from snapsell.outbox.v1 import outbox_pb2

from infra.convert import channel_maps, enum_maps, proto_numbers, timestamp
from services.outbox.domain import (
    AttemptOutcome,
    Channel,
    DeadReason,
    MessageKind,
    MessageStatus,
    StoredAttempt,
)

CHANNEL_TO_PROTO, CHANNEL_FROM_PROTO = channel_maps(Channel)
KIND_TO_PROTO, KIND_FROM_PROTO = enum_maps(
    MessageKind, proto_numbers(outbox_pb2.MessageKind.items(), "MESSAGE_KIND_")
)
STATUS_TO_PROTO, _STATUS_FROM_PROTO = enum_maps(
    MessageStatus, proto_numbers(outbox_pb2.MessageStatus.items(), "MESSAGE_STATUS_")
)
DEAD_REASON_TO_PROTO, DEAD_REASON_FROM_PROTO = enum_maps(
    DeadReason, proto_numbers(outbox_pb2.DeadReason.items(), "DEAD_REASON_")
)
ATTEMPT_OUTCOME_TO_PROTO, _OUTCOME_FROM_PROTO = enum_maps(
    AttemptOutcome, proto_numbers(outbox_pb2.AttemptOutcome.items(), "ATTEMPT_OUTCOME_")
)


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
