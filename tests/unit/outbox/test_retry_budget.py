"""The retry budget, a time per message kind: what a failed send leads to (`resolutions`, on
`RetryPolicy`'s rules) depending on the error and on how much of the budget is left."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from services.outbox.domain import (
    AttemptOutcome,
    AttemptRecord,
    ClaimedMessage,
    DeadReason,
    ErrorClass,
    MessageKind,
    MessageStatus,
    Resolution,
    RetryPolicy,
    SendFailure,
)
from services.outbox.events import DEAD_LETTERED_SUBJECT
from services.outbox.sending import resolutions
from tests.unit.outbox.builders import NOW, claimed

POLICY = RetryPolicy()  # 15 min conversational, 24 h compliance, 1 s x2 up to 30 s, no cap
CONVERSATIONAL = timedelta(minutes=15)
SERVER_ERROR = SendFailure(ErrorClass.RETRYABLE, "Service Unavailable", 503, None)
REFUSED = SendFailure(ErrorClass.PERMANENT, "invalid 'To' number", 400, 21211)
TIMED_OUT = SendFailure(ErrorClass.OUTCOME_UNKNOWN, "timed out")


def _waiting(for_: timedelta, **changes: object) -> ClaimedMessage:
    """A message with no cap on attempts whose budget started `for_` ago."""
    fields: dict[str, object] = {"max_attempts": 0, "attempt_count": 40}
    return claimed(budget_started_at=NOW - for_, **(fields | changes))


def _after(failure: SendFailure, message: ClaimedMessage, jitter: float = 0.0) -> Resolution:
    attempt = resolutions.failed_attempt(failure, NOW - timedelta(seconds=1), NOW)
    return resolutions.after_failure(
        message,
        failure,
        (attempt,),
        retry=POLICY,
        reconcile_delay_s=5,
        now=NOW,
        jitter=jitter,
        traceparent=None,
    )


@pytest.mark.parametrize(
    ("failure", "kind", "waited", "status", "reason"),
    [
        # An outage far longer than five attempts: still retried.
        (SERVER_ERROR, MessageKind.CONVERSATIONAL, timedelta(minutes=5), "pending", None),
        (SERVER_ERROR, MessageKind.CONVERSATIONAL, CONVERSATIONAL, "dead", "attempts_exhausted"),
        (SERVER_ERROR, MessageKind.COMPLIANCE, timedelta(hours=23), "pending", None),
        (SERVER_ERROR, MessageKind.COMPLIANCE, timedelta(hours=24), "dead", "attempts_exhausted"),
        # Refused for good: dead at once, whatever budget is left.
        (REFUSED, MessageKind.COMPLIANCE, timedelta(0), "dead", "permanent_error"),
        # Twilio may have it: asked before anything else, even past the deadline.
        (TIMED_OUT, MessageKind.CONVERSATIONAL, timedelta(hours=1), "pending", None),
    ],
)
def test_a_failed_send_is_retried_until_its_kinds_deadline(
    failure: SendFailure,
    kind: MessageKind,
    waited: timedelta,
    status: str,
    reason: str | None,
) -> None:
    resolution = _after(failure, _waiting(waited, kind=kind))
    assert (resolution.status.value, resolution.dead_reason) == (status, reason)
    assert resolution.attempt_increment == 1
    if status == "dead":
        assert [e.subject for e in resolution.events] == [DEAD_LETTERED_SUBJECT]


def test_the_deadline_counts_from_the_budgets_start_per_kind() -> None:
    start = datetime(2026, 11, 23, 8, 0, tzinfo=NOW.tzinfo)
    assert POLICY.deadline(MessageKind.CONVERSATIONAL, start) == start + CONVERSATIONAL
    assert POLICY.deadline(MessageKind.COMPLIANCE, start) == start + timedelta(hours=24)


@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999999])
def test_retries_before_the_deadline_back_off_capped_and_jittered(jitter: float) -> None:
    early = _after(SERVER_ERROR, _waiting(timedelta(seconds=2), attempt_count=1), jitter)
    late = _after(SERVER_ERROR, _waiting(timedelta(minutes=5), attempt_count=40), jitter)
    # Attempt 2: a 2 s step; attempt 41: the 30 s cap; half of each step is jitter.
    assert _delay(early) == pytest.approx(1 + jitter, abs=1e-6)
    assert _delay(late) == pytest.approx(15 + 15 * jitter, abs=1e-6)


def test_the_last_retry_is_at_the_deadline_not_past_it() -> None:
    message = _waiting(CONVERSATIONAL - timedelta(seconds=10))
    resolution = _after(SERVER_ERROR, message, jitter=0.999999)
    assert resolution.next_attempt_at == NOW + timedelta(seconds=10)
    assert resolution.next_attempt_at == POLICY.deadline(message.kind, message.budget_started_at)


def test_a_retry_after_is_honoured_within_the_budget() -> None:
    limited = SendFailure(ErrorClass.RETRYABLE, "Too Many Requests", 429, 20429, 120.0)
    resolution = _after(limited, _waiting(timedelta(minutes=1)))
    assert _delay(resolution) == 120


def test_a_cap_on_attempts_still_ends_a_message_before_its_deadline() -> None:
    resolution = _after(
        SERVER_ERROR, _waiting(timedelta(seconds=3), max_attempts=5, attempt_count=4)
    )
    assert resolution.status is MessageStatus.DEAD
    assert resolution.dead_reason is DeadReason.ATTEMPTS_EXHAUSTED


def test_a_changed_budget_applies_to_the_messages_already_waiting() -> None:
    message = _waiting(timedelta(minutes=20))
    assert _retry_at(POLICY, message) is None
    assert _retry_at(RetryPolicy(conversational_budget_s=3600), message) is not None


def test_twilio_unreadable_gives_up_on_the_unknown_outcome_at_the_deadline() -> None:
    attempt = AttemptRecord(AttemptOutcome.OUTCOME_UNKNOWN, NOW, NOW, error_message="HTTP 503")
    since = NOW - timedelta(minutes=1)

    def after_list_failed(message: ClaimedMessage) -> Resolution:
        return resolutions.reconcile_failed(
            message,
            "HTTP 503",
            attempt,
            retry=POLICY,
            reconcile_delay_s=5,
            now=NOW,
            jitter=0.0,
            traceparent=None,
        )

    still = after_list_failed(_waiting(timedelta(minutes=14), reconcile_failures=30))
    assert still.status is MessageStatus.PENDING and still.reconcile_failure_increment == 1
    spent = after_list_failed(_waiting(CONVERSATIONAL, reconcile_since=since))
    assert spent.status is MessageStatus.DEAD
    assert spent.dead_reason is DeadReason.OUTCOME_UNKNOWN
    assert spent.reconcile_since == since  # a redrive asks Twilio first


def _delay(resolution: Resolution) -> float:
    assert resolution.status is MessageStatus.PENDING and resolution.next_attempt_at is not None
    return (resolution.next_attempt_at - NOW).total_seconds()


def _retry_at(policy: RetryPolicy, message: ClaimedMessage) -> datetime | None:
    return policy.retry_at(
        kind=message.kind,
        budget_started_at=message.budget_started_at,
        attempt=message.attempt_count + 1,
        max_attempts=message.max_attempts,
        now=NOW,
        jitter=0.0,
    )
