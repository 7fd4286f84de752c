"""The records the sender side reads and writes: a new message, a claimed one, and how a
claim ended (`Resolution`, with its attempts and events) for the batch writer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from services.outbox.domain import (
    AttemptOutcome,
    Channel,
    DeadReason,
    MessageKind,
    MessageStatus,
    twilio_address,
)


@dataclass(frozen=True, slots=True)
class NewMessage:
    tenant_id: str
    idempotency_key: str
    correlation_id: str
    kind: MessageKind
    account_sid: str
    sender: str
    recipient_channel: Channel
    recipient: str
    body: str | None
    content_sid: str | None
    content_variables: str | None
    not_before: datetime | None
    max_attempts: int
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    id: uuid.UUID
    tenant_id: str
    correlation_id: str
    kind: MessageKind
    account_sid: str
    sender: str
    channel: Channel
    recipient: str
    body: str | None
    content_sid: str | None
    content_variables: str | None
    # Attempts made before this claim (a lease that ran out counts as one).
    attempt_count: int
    max_attempts: int
    reconcile_failures: int
    claimed_at: datetime
    reconcile_since: datetime | None
    traceparent: str | None
    lease_expired: bool

    @property
    def to(self) -> str:
        return twilio_address(self.channel, self.recipient)

    @property
    def sender_key(self) -> str:
        return f"{self.account_sid}/{self.sender}"

    @property
    def is_template(self) -> bool:
        return self.content_sid is not None


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    outcome: AttemptOutcome
    started_at: datetime
    finished_at: datetime
    http_status: int | None = None
    error_code: int | None = None
    error_message: str | None = None
    twilio_sid: str | None = None


@dataclass(frozen=True, slots=True)
class PendingEvent:
    subject: str
    payload: bytes
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """How one claim ended: the message's next state and what to record with it."""

    message_id: uuid.UUID
    tenant_id: str
    # SENT, PENDING (retry later), DEAD or BLOCKED.
    status: MessageStatus
    attempts: tuple[AttemptRecord, ...] = ()
    attempt_increment: int = 0
    reconcile_failure_increment: int = 0
    next_attempt_at: datetime | None = None
    # Stored as is: None clears it.
    reconcile_since: datetime | None = None
    twilio_sid: str | None = None
    twilio_status: str | None = None
    sent_at: datetime | None = None
    dead_reason: DeadReason | None = None
    error_code: int | None = None
    error_message: str | None = None
    events: tuple[PendingEvent, ...] = field(default=())
