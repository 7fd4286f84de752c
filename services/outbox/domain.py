"""Pure rules and value types of the outbox (no I/O): message states and their forward-only
moves, what to do before a send (consent, WhatsApp's 24-hour window), how Twilio's answers are
classified, when to retry, the per-sender token bucket with its fair queue across tenants, and
the records the service stores and reads (a new message, a claimed one, how a claim ended as a
`Resolution` with its attempts and events, an attempt read back).

Errors: `InvalidMessageError` (a request that can never be valid; one line for the caller;
raised by `validation.py`).
"""

from __future__ import annotations

import enum
import re
import uuid
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Generic, TypeVar


class InvalidMessageError(ValueError):
    """The message cannot be accepted; the text says why in one line."""


class MessageKind(enum.StrEnum):
    CONVERSATIONAL = "conversational"
    COMPLIANCE = "compliance"


class MessageStatus(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"
    UNDELIVERED = "undelivered"
    BLOCKED = "blocked"
    DEAD = "dead"
    DISCARDED = "discarded"


class DeadReason(enum.StrEnum):
    OUTSIDE_SESSION_WINDOW = "outside_session_window"
    PERMANENT_ERROR = "permanent_error"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    OUTCOME_UNKNOWN = "outcome_unknown"


class AttemptOutcome(enum.StrEnum):
    ACCEPTED = "accepted"
    RETRYABLE_ERROR = "retryable_error"
    PERMANENT_ERROR = "permanent_error"
    OUTCOME_UNKNOWN = "outcome_unknown"
    LEASE_EXPIRED = "lease_expired"
    RECONCILED_FOUND = "reconciled_found"
    RECONCILED_NOT_FOUND = "reconciled_not_found"


class Channel(enum.StrEnum):
    SMS = "sms"
    WHATSAPP = "whatsapp"
    MESSENGER = "messenger"


# --- Twilio addresses -----------------------------------------------------------------------------

_MESSAGING_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
_ADDRESS_PREFIX = {Channel.SMS: "", Channel.WHATSAPP: "whatsapp:", Channel.MESSENGER: "messenger:"}


def twilio_address(channel: Channel, value: str) -> str:
    """Twilio's `To`/`From` form of an address: "whatsapp:+33...", "+33...", "messenger:..."."""
    return _ADDRESS_PREFIX[channel] + value


def address_prefix(channel: Channel) -> str:
    return _ADDRESS_PREFIX[channel]


def is_messaging_service_sid(sender: str) -> bool:
    return bool(_MESSAGING_SERVICE_SID.fullmatch(sender))


# --- the status state machine -----------------------------------------------------------------

# Twilio accepted the message; only status callbacks move it further.
ACCEPTED_STATUSES = frozenset({MessageStatus.SENT, MessageStatus.DELIVERED, MessageStatus.READ})
_DELIVERY_RANK = {MessageStatus.SENT: 0, MessageStatus.DELIVERED: 1, MessageStatus.READ: 2}

# Twilio's MessageStatus values (callbacks and API) and the outbox status each one means.
# Twilio's accepted/scheduled/queued/sending/sent all mean "Twilio has it": SENT for us.
TWILIO_STATUS_MAP: dict[str, MessageStatus] = {
    "accepted": MessageStatus.SENT,
    "scheduled": MessageStatus.SENT,
    "queued": MessageStatus.SENT,
    "sending": MessageStatus.SENT,
    "sent": MessageStatus.SENT,
    "delivered": MessageStatus.DELIVERED,
    "read": MessageStatus.READ,
    "failed": MessageStatus.FAILED,
    "undelivered": MessageStatus.UNDELIVERED,
    "canceled": MessageStatus.FAILED,
}
# Twilio's own progression, to keep the most advanced raw status seen.
_TWILIO_STATUS_ORDER = ("accepted", "scheduled", "queued", "sending", "sent", "delivered", "read")


def status_from_twilio(twilio_status: str) -> MessageStatus | None:
    """The outbox status a Twilio status string means; None for statuses of inbound messages."""
    return TWILIO_STATUS_MAP.get(twilio_status.strip().lower())


def can_apply_callback(current: MessageStatus, target: MessageStatus) -> bool:
    """Whether a status callback may move a message from `current` to `target`.

    Forward only: sent -> delivered -> read; failed / undelivered only straight after sent
    (a message that was delivered cannot fail afterwards). Duplicates and late callbacks
    (e.g. `delivered` after `read`) change nothing."""
    if current not in ACCEPTED_STATUSES:
        return False
    if target in (MessageStatus.FAILED, MessageStatus.UNDELIVERED):
        return current is MessageStatus.SENT
    if target not in _DELIVERY_RANK:
        return False
    return _DELIVERY_RANK[target] > _DELIVERY_RANK[current]


def newer_twilio_status(stored: str | None, reported: str) -> bool:
    """Whether `reported` is further along Twilio's own progression than `stored` (failures
    are recorded with the status change they cause, not here)."""
    if stored is None:
        return True
    if reported not in _TWILIO_STATUS_ORDER or stored not in _TWILIO_STATUS_ORDER:
        return False
    return _TWILIO_STATUS_ORDER.index(reported) > _TWILIO_STATUS_ORDER.index(stored)


# --- retries -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a message whose send failed is tried again, and until when.

    Capped exponential backoff with jitter (seed defaults: 1 s base, x2, 30 s cap), for as long
    as the message's kind allows, counted from when it was first due (or redriven): 15 minutes
    for a conversational message (a reply later than that has lost its point), 24 hours for a
    compliance one (a STOP confirmation is owed however late). A time rather than a count:
    five attempts are spent in about 15 s, so a one-minute Twilio or network outage would
    dead-letter every message waiting. `max_attempts` caps the attempts as well (0: no cap)."""

    conversational_budget_s: float = 15 * 60.0
    compliance_budget_s: float = 24 * 3600.0
    max_attempts: int = 0
    base_s: float = 1.0
    multiplier: float = 2.0
    cap_s: float = 30.0
    # A Retry-After beyond this is not believed (a misbehaving proxy must not park messages).
    retry_after_cap_s: float = 300.0

    def backoff_s(self, attempt: int, jitter: float) -> float:
        """Delay after the `attempt`-th failed attempt (1-based); `jitter` is uniform in [0, 1).

        "Equal jitter": half the exponential step is kept, half is random, so retries of a
        burst spread out without ever retrying much sooner than planned."""
        step = min(self.cap_s, self.base_s * self.multiplier ** max(0, attempt - 1))
        return step / 2 + step / 2 * jitter

    def retry_delay_s(self, attempt: int, jitter: float, retry_after_s: float | None) -> float:
        """Backoff, but never sooner than the server's Retry-After (itself capped)."""
        delay = self.backoff_s(attempt, jitter)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.retry_after_cap_s))
        return delay

    def deadline(self, kind: MessageKind, budget_started_at: datetime) -> datetime:
        """The last moment a message of `kind` whose budget started then is tried."""
        budget_s = (
            self.compliance_budget_s
            if kind is MessageKind.COMPLIANCE
            else self.conversational_budget_s
        )
        return budget_started_at + timedelta(seconds=budget_s)

    def budget_spent(
        self,
        *,
        kind: MessageKind,
        budget_started_at: datetime,
        attempts: int,
        max_attempts: int,
        now: datetime,
    ) -> bool:
        """Whether a message whose last try failed (`attempts` made, of `max_attempts`, 0 for
        no cap) gives up at `now`: its kind's deadline is reached, or its attempts are."""
        return now >= self.deadline(kind, budget_started_at) or 0 < max_attempts <= attempts

    def retry_at(
        self,
        *,
        kind: MessageKind,
        budget_started_at: datetime,
        attempt: int,
        max_attempts: int,
        now: datetime,
        jitter: float,
        retry_after_s: float | None = None,
    ) -> datetime | None:
        """When to try again after the `attempt`-th attempt (1-based) failed at `now` with an
        error worth retrying, or None when the budget is spent (`budget_spent`). A retry is
        never planned past the deadline: the last one is at the deadline itself."""
        if self.budget_spent(
            kind=kind,
            budget_started_at=budget_started_at,
            attempts=attempt,
            max_attempts=max_attempts,
            now=now,
        ):
            return None
        delay = timedelta(seconds=self.retry_delay_s(attempt, jitter, retry_after_s))
        return min(now + delay, self.deadline(kind, budget_started_at))


# --- Twilio error classification ---------------------------------------------------------------


class ErrorClass(enum.StrEnum):
    RETRYABLE = "retryable"
    PERMANENT = "permanent"
    # The request may have reached Twilio and been accepted: settle it before any resend.
    OUTCOME_UNKNOWN = "outcome_unknown"


UNSUBSCRIBED_ERROR_CODE = 21610
# Refusals that the same request will always get again.
PERMANENT_ERROR_CODES = frozenset(
    {
        21211,  # invalid 'To' number
        21408,  # permission to send to this region not enabled
        21602,  # body required
        21603,  # 'From' required
        21604,  # 'To' required
        21606,  # 'From' is not a valid sender for this account
        21610,  # recipient unsubscribed (replied STOP to Twilio)
        21612,  # 'To' not reachable from this 'From'
        21614,  # 'To' is not a mobile number
        21617,  # body over 1,600 characters
        63016,  # WhatsApp free-form message outside the 24-hour window
        63024,  # invalid WhatsApp recipient
    }
)
# Twilio codes that mean "later" whatever the HTTP status.
RETRYABLE_ERROR_CODES = frozenset({20429, 20500, 20503, 63018})


def classify_http_error(http_status: int, error_code: int | None) -> ErrorClass:
    """An HTTP error answer from Twilio: nothing was created, so never OUTCOME_UNKNOWN."""
    if error_code in PERMANENT_ERROR_CODES:
        return ErrorClass.PERMANENT
    if error_code in RETRYABLE_ERROR_CODES or http_status == 429 or http_status >= 500:
        return ErrorClass.RETRYABLE
    # Credentials or account problems are fixed by an operator; the message should wait
    # (and dead-letter when its retry budget is spent) rather than be declared undeliverable.
    if http_status in (401, 403):
        return ErrorClass.RETRYABLE
    return ErrorClass.PERMANENT


@dataclass(frozen=True, slots=True)
class SendFailure:
    error_class: ErrorClass
    message: str
    http_status: int | None = None
    error_code: int | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class SendAccepted:
    twilio_sid: str
    twilio_status: str
    http_status: int


SendResult = SendAccepted | SendFailure


# --- before a send: consent and the WhatsApp window -----------------------------------------

WHATSAPP_SESSION_WINDOW = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class Consent:
    """What routing says about a recipient (CheckOptOut)."""

    opted_out: bool
    opted_out_at: datetime | None = None
    last_inbound_at: datetime | None = None


class PreSendDecision(enum.StrEnum):
    SEND = "send"
    BLOCK_OPTED_OUT = "block_opted_out"
    DEAD_OUTSIDE_WINDOW = "dead_outside_window"


def decide_before_send(
    *,
    kind: MessageKind,
    channel: Channel,
    is_template: bool,
    consent: Consent,
    now: datetime,
    window: timedelta = WHATSAPP_SESSION_WINDOW,
) -> PreSendDecision:
    """Consent first (only COMPLIANCE messages reach an opted-out person), then WhatsApp's rule
    that a free-form body needs an inbound message from the recipient in the last 24 hours."""
    if consent.opted_out and kind is not MessageKind.COMPLIANCE:
        return PreSendDecision.BLOCK_OPTED_OUT
    if channel is Channel.WHATSAPP and not is_template:
        last = consent.last_inbound_at
        if last is None or now - last > window:
            return PreSendDecision.DEAD_OUTSIDE_WINDOW
    return PreSendDecision.SEND


# --- per-sender rate limit with fairness across tenants ----------------------------------------


class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` saved up. `reserve` hands out the next
    token even when none is left and says how long to wait for it, so waiters are served in
    order and the long-run rate is exact."""

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = burst
        self._updated = now

    def reserve(self, now: float) -> float:
        """Take one token; returns the seconds to wait before using it (0 when available)."""
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
        self._updated = max(self._updated, now)
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_per_s


Key = TypeVar("Key", bound=Hashable)
Item = TypeVar("Item")


class FairQueue(Generic[Key, Item]):
    """FIFO per key (tenant), served round-robin across keys: one tenant's burst waits its
    turn behind every other tenant's next message instead of in front of all of them."""

    def __init__(self) -> None:
        self._queues: dict[Key, deque[Item]] = {}
        self._turns: deque[Key] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def count(self, key: Key) -> int:
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    def push(self, key: Key, item: Item) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._turns.append(key)
        queue.append(item)
        self._size += 1

    def pop(self) -> Item | None:
        if not self._turns:
            return None
        key = self._turns.popleft()
        queue = self._queues[key]
        item = queue.popleft()
        if queue:
            self._turns.append(key)
        else:
            del self._queues[key]
        self._size -= 1
        return item

    def drain(self) -> list[Item]:
        items = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        self._turns.clear()
        self._size = 0
        return items


# --- records: a new message, a claimed one, how a claim ended, an attempt read back ---------


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
    # Attempts made before this claim (a lease that ran out counts as one), and their cap
    # (0: none).
    attempt_count: int
    max_attempts: int
    reconcile_failures: int
    # When the retry budget started: first due, or redriven (RetryPolicy.deadline).
    budget_started_at: datetime
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


@dataclass(frozen=True, slots=True)
class StoredAttempt:
    """One attempt as read back for the API (`store.OutboxAdminStore.get_message`)."""

    outcome: str
    started_at: datetime
    finished_at: datetime
    http_status: int | None
    error_code: int | None
    error_message: str | None
    twilio_sid: str | None
    worker_id: str
