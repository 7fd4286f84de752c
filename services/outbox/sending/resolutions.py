"""What to record when a claim ends (pure): the message's next state as a `Resolution`, with
its attempt rows and events. After a failed send, `after_failure` decides between a retry, a
dead letter and a reconciliation: a permanent refusal is dead at once, an error worth
retrying is retried with backoff until the message's retry budget (`RetryPolicy`: a deadline
per kind) is spent. `send.py` decides which of these ends happened, and `writer.py` writes
them."""

from __future__ import annotations

from datetime import datetime, timedelta

from services.outbox import events
from services.outbox.domain import (
    UNSUBSCRIBED_ERROR_CODE,
    AttemptOutcome,
    AttemptRecord,
    ClaimedMessage,
    DeadReason,
    ErrorClass,
    MessageStatus,
    Resolution,
    RetryPolicy,
    SendFailure,
)

_ATTEMPT_OUTCOME = {
    ErrorClass.RETRYABLE: AttemptOutcome.RETRYABLE_ERROR,
    ErrorClass.PERMANENT: AttemptOutcome.PERMANENT_ERROR,
    ErrorClass.OUTCOME_UNKNOWN: AttemptOutcome.OUTCOME_UNKNOWN,
}


def failed_attempt(failure: SendFailure, started: datetime, finished: datetime) -> AttemptRecord:
    return AttemptRecord(
        _ATTEMPT_OUTCOME[failure.error_class],
        started,
        finished,
        failure.http_status,
        failure.error_code,
        failure.message,
    )


def sent(
    message: ClaimedMessage,
    *,
    twilio_sid: str,
    twilio_status: str,
    attempts: tuple[AttemptRecord, ...],
    attempt_increment: int,
    sent_at: datetime,
    reconciled: bool,
    traceparent: str | None,
) -> Resolution:
    event = events.message_sent(
        message,
        twilio_sid=twilio_sid,
        attempt_count=message.attempt_count + attempt_increment,
        reconciled=reconciled,
        sent_at=sent_at,
        traceparent=traceparent,
    )
    return Resolution(
        message.id,
        message.tenant_id,
        MessageStatus.SENT,
        attempts,
        attempt_increment=attempt_increment,
        twilio_sid=twilio_sid,
        twilio_status=twilio_status,
        sent_at=sent_at,
        events=(event,),
    )


def blocked(
    message: ClaimedMessage,
    *,
    opted_out_since: datetime | None,
    at: datetime,
    attempts: tuple[AttemptRecord, ...],
    traceparent: str | None,
) -> Resolution:
    event = events.message_blocked_optout(
        message, opted_out_since=opted_out_since, blocked_at=at, traceparent=traceparent
    )
    return Resolution(
        message.id, message.tenant_id, MessageStatus.BLOCKED, attempts, events=(event,)
    )


def later(
    message: ClaimedMessage,
    *,
    due_at: datetime,
    attempts: tuple[AttemptRecord, ...] = (),
    keep_reconcile: bool = False,
) -> Resolution:
    """Back to pending without using an attempt (nothing was asked of Twilio)."""
    return Resolution(
        message.id,
        message.tenant_id,
        MessageStatus.PENDING,
        attempts,
        next_attempt_at=due_at,
        reconcile_since=message.reconcile_since if keep_reconcile else None,
    )


def dead(
    message: ClaimedMessage,
    *,
    reason: DeadReason,
    attempts: tuple[AttemptRecord, ...],
    attempt_increment: int,
    error_code: int | None,
    error_message: str | None,
    at: datetime,
    traceparent: str | None,
    keep_reconcile: bool = False,
) -> Resolution:
    """Dead-lettered; a 21610 refusal also tells routing the recipient unsubscribed."""
    recorded = [
        events.message_dead_lettered(
            message,
            reason=reason,
            attempt_count=message.attempt_count + attempt_increment,
            error_code=error_code,
            error_message=error_message,
            dead_at=at,
            traceparent=traceparent,
        )
    ]
    if error_code == UNSUBSCRIBED_ERROR_CODE:
        recorded.append(
            events.recipient_unsubscribed(
                message, error_code=error_code, occurred_at=at, traceparent=traceparent
            )
        )
    return Resolution(
        message.id,
        message.tenant_id,
        MessageStatus.DEAD,
        attempts,
        attempt_increment=attempt_increment,
        reconcile_since=message.reconcile_since if keep_reconcile else None,
        dead_reason=reason,
        error_code=error_code,
        error_message=error_message,
        events=tuple(recorded),
    )


def after_failure(
    message: ClaimedMessage,
    failure: SendFailure,
    attempts: tuple[AttemptRecord, ...],
    *,
    retry: RetryPolicy,
    reconcile_delay_s: float,
    now: datetime,
    jitter: float,
    traceparent: str | None,
) -> Resolution:
    """A send that Twilio did not accept (or may have): dead, retried, or to be reconciled."""
    number = message.attempt_count + 1
    code, text = failure.error_code, failure.message
    if failure.error_class is ErrorClass.PERMANENT:
        return dead(
            message,
            reason=DeadReason.PERMANENT_ERROR,
            attempts=attempts,
            attempt_increment=1,
            error_code=code,
            error_message=text,
            at=now,
            traceparent=traceparent,
        )
    if failure.error_class is ErrorClass.OUTCOME_UNKNOWN:
        # Twilio may have it: the next claim asks Twilio before anything else, even when the
        # retry budget is spent (a message that was sent is not a dead letter).
        delay = max(reconcile_delay_s, retry.backoff_s(number, jitter))
        return Resolution(
            message.id,
            message.tenant_id,
            MessageStatus.PENDING,
            attempts,
            attempt_increment=1,
            next_attempt_at=now + timedelta(seconds=delay),
            reconcile_since=message.claimed_at,
            error_code=code,
            error_message=text,
        )
    retry_at = retry.retry_at(
        kind=message.kind,
        budget_started_at=message.budget_started_at,
        attempt=number,
        max_attempts=message.max_attempts,
        now=now,
        jitter=jitter,
        retry_after_s=failure.retry_after_s,
    )
    if retry_at is None:
        return dead(
            message,
            reason=DeadReason.ATTEMPTS_EXHAUSTED,
            attempts=attempts,
            attempt_increment=1,
            error_code=code,
            error_message=text,
            at=now,
            traceparent=traceparent,
        )
    return Resolution(
        message.id,
        message.tenant_id,
        MessageStatus.PENDING,
        attempts,
        attempt_increment=1,
        next_attempt_at=retry_at,
        error_code=code,
        error_message=text,
    )


def reconcile_failed(
    message: ClaimedMessage,
    error: str,
    attempt: AttemptRecord,
    *,
    retry: RetryPolicy,
    reconcile_delay_s: float,
    now: datetime,
    jitter: float,
    traceparent: str | None,
) -> Resolution:
    """Twilio's list could not be read: the outcome stays unknown; ask again later, and give
    up (dead, OUTCOME_UNKNOWN, still to be reconciled on redrive) when the retry budget is
    spent (its deadline, or as many tries as attempts when those are capped)."""
    failures = message.reconcile_failures + 1
    if retry.budget_spent(
        kind=message.kind,
        budget_started_at=message.budget_started_at,
        attempts=failures,
        max_attempts=message.max_attempts,
        now=now,
    ):
        return dead(
            message,
            reason=DeadReason.OUTCOME_UNKNOWN,
            attempts=(attempt,),
            attempt_increment=0,
            error_code=None,
            error_message=error,
            at=now,
            traceparent=traceparent,
            keep_reconcile=True,
        )
    delay = max(reconcile_delay_s, retry.backoff_s(failures, jitter))
    return Resolution(
        message.id,
        message.tenant_id,
        MessageStatus.PENDING,
        (attempt,),
        reconcile_failure_increment=1,
        next_attempt_at=now + timedelta(seconds=delay),
        reconcile_since=message.reconcile_since,
        error_message=error,
    )
