"""One claimed message through the delivery use case, with small hand-written fakes for
Twilio, routing's consent answer and the reconciliation look-ups."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from snapsell.outbox.v1 import events_pb2

from services.outbox.clients import ConsentUnavailableError, Recipient
from services.outbox.config import WorkerConfig
from services.outbox.domain import (
    AttemptOutcome,
    Channel,
    ClaimedMessage,
    Consent,
    DeadReason,
    ErrorClass,
    MessageKind,
    MessageStatus,
    RetryPolicy,
    SendAccepted,
    SendFailure,
    SendResult,
)
from services.outbox.events import (
    BLOCKED_OPTOUT_SUBJECT,
    DEAD_LETTERED_SUBJECT,
    RECIPIENT_UNSUBSCRIBED_SUBJECT,
    SENT_SUBJECT,
)
from services.outbox.sending.consent import BatchConsent, ConsentAnswer
from services.outbox.sending.reconcile import TwilioMessageView
from services.outbox.sending.send import MessageDelivery
from services.outbox.sending.twilio_api import ReconciliationError
from tests.unit.outbox.builders import NOW, claimed

CONFIG = WorkerConfig(
    enabled=True,
    max_in_flight=8,
    claim_batch=10,
    lease_s=60,
    poll_interval_s=1,
    flush_interval_s=0,
    send_timeout_s=10,
    retry=RetryPolicy(max_attempts=3, base_s=1, multiplier=2, cap_s=30),
    rate_per_sender=0,
    rate_burst=1,
    reconcile_delay_s=5,
    reconcile_clock_skew_s=2,
    consent_retry_s=2,
    consent_timeout_s=2,
    consent_max_age_s=1,
    whatsapp_window_s=86_400,
)


class FakeTwilio:
    def __init__(self, *results: SendResult, listed: Sequence[TwilioMessageView] = ()) -> None:
        self.results = list(results)
        self.listed = list(listed)
        self.sent: list[ClaimedMessage] = []
        self.list_error: str | None = None

    async def send(self, message: ClaimedMessage) -> SendResult:
        self.sent.append(message)
        return self.results.pop(0)

    async def recent_messages(
        self, message: ClaimedMessage, since: datetime, clock_skew: timedelta
    ) -> list[TwilioMessageView]:
        if self.list_error:
            raise ReconciliationError(self.list_error)
        return self.listed


class FakeConsent:
    def __init__(self, consent: Consent | None = None) -> None:
        self.consent = consent or Consent(opted_out=False, last_inbound_at=NOW)
        self.asked = 0

    async def check_many(self, recipients: Sequence[Recipient]) -> list[Consent]:
        self.asked += 1
        if self.consent is None:
            raise ConsentUnavailableError("routing down")
        return [self.consent] * len(recipients)


class FakeLedger:
    def __init__(self, *, blocked: bool = False, taken: frozenset[str] = frozenset()) -> None:
        self.blocked, self.taken = blocked, taken
        self.resends: list[uuid.UUID] = []

    async def reconcile_check(
        self, message: ClaimedMessage, candidate_sids: Sequence[str]
    ) -> tuple[bool, frozenset[str]]:
        return self.blocked, self.taken

    async def start_resend(self, worker_id: str, message_id: uuid.UUID) -> bool:
        self.resends.append(message_id)
        return True


def delivery(
    twilio: FakeTwilio, consent: FakeConsent | None = None, ledger: FakeLedger | None = None
) -> MessageDelivery:
    return MessageDelivery(
        ledger or FakeLedger(),
        twilio,
        BatchConsent(consent or FakeConsent(), max_age_s=CONFIG.consent_max_age_s),
        CONFIG,
        "worker-1",
        now=lambda: NOW,
        jitter=lambda: 0.0,
    )


ACCEPTED = SendAccepted("SM" + "a" * 32, "queued", 201)


async def test_an_accepted_send_is_recorded_with_its_sid_and_a_sent_event() -> None:
    twilio = FakeTwilio(ACCEPTED)
    resolution = await delivery(twilio).resolve(claimed())
    assert resolution.status is MessageStatus.SENT
    assert resolution.twilio_sid == ACCEPTED.twilio_sid
    assert [a.outcome for a in resolution.attempts] == [AttemptOutcome.ACCEPTED]
    assert [e.subject for e in resolution.events] == [SENT_SUBJECT]
    event = events_pb2.MessageSent.FromString(resolution.events[0].payload)
    assert event.twilio_sid == ACCEPTED.twilio_sid and not event.reconciled


async def test_an_opted_out_recipient_is_blocked_without_calling_twilio() -> None:
    twilio = FakeTwilio()
    consent = FakeConsent(Consent(opted_out=True, opted_out_at=NOW - timedelta(days=1)))
    resolution = await delivery(twilio, consent).resolve(claimed())
    assert resolution.status is MessageStatus.BLOCKED
    assert twilio.sent == []
    assert [e.subject for e in resolution.events] == [BLOCKED_OPTOUT_SUBJECT]


async def test_a_compliance_message_reaches_an_opted_out_recipient() -> None:
    twilio = FakeTwilio(ACCEPTED)
    consent = FakeConsent(Consent(opted_out=True, opted_out_at=NOW, last_inbound_at=NOW))
    message = claimed(kind=MessageKind.COMPLIANCE)
    resolution = await delivery(twilio, consent).resolve(message)
    assert resolution.status is MessageStatus.SENT and twilio.sent == [message]


async def test_free_form_whatsapp_outside_the_window_is_dead_without_calling_twilio() -> None:
    twilio = FakeTwilio()
    consent = FakeConsent(Consent(opted_out=False, last_inbound_at=NOW - timedelta(hours=30)))
    message = claimed(channel=Channel.WHATSAPP, sender="whatsapp:+14155550100")
    resolution = await delivery(twilio, consent).resolve(message)
    assert resolution.status is MessageStatus.DEAD
    assert resolution.dead_reason is DeadReason.OUTSIDE_SESSION_WINDOW
    assert twilio.sent == []


async def test_routing_unavailable_postpones_without_using_an_attempt() -> None:
    twilio = FakeTwilio()
    consent = FakeConsent()
    consent.consent = None  # type: ignore[assignment]
    resolution = await delivery(twilio, consent).resolve(claimed())
    assert resolution.status is MessageStatus.PENDING
    assert resolution.attempt_increment == 0 and twilio.sent == []


async def test_the_claimed_batchs_answer_decides_without_asking_again() -> None:
    twilio = FakeTwilio()
    consent = FakeConsent(Consent(opted_out=True, opted_out_at=NOW))
    use_case = delivery(twilio, consent)
    message = claimed()
    answers = await use_case.check_consent([message])
    consent.consent = Consent(opted_out=False, last_inbound_at=NOW)  # would say "send"
    resolution = await use_case.resolve(message, answers[message.id])
    assert resolution.status is MessageStatus.BLOCKED and twilio.sent == []
    assert consent.asked == 1


async def test_a_batch_routing_could_not_answer_postpones_its_messages() -> None:
    twilio = FakeTwilio()
    answer = ConsentAnswer(None, asked_at=0.0)
    resolution = await delivery(twilio).resolve(claimed(), answer)
    assert resolution.status is MessageStatus.PENDING
    assert resolution.next_attempt_at == NOW + timedelta(seconds=CONFIG.consent_retry_s)
    assert resolution.attempt_increment == 0 and twilio.sent == []


async def test_a_429_is_retried_no_sooner_than_its_retry_after() -> None:
    limited = SendFailure(ErrorClass.RETRYABLE, "Too Many Requests", 429, 20429, 12.0)
    resolution = await delivery(FakeTwilio(limited)).resolve(claimed())
    assert resolution.status is MessageStatus.PENDING
    assert resolution.next_attempt_at == NOW + timedelta(seconds=12)
    assert resolution.attempt_increment == 1


async def test_a_retryable_failure_at_the_attempts_cap_dead_letters_the_message() -> None:
    failure = SendFailure(ErrorClass.RETRYABLE, "Internal Server Error", 500, 20500)
    resolution = await delivery(FakeTwilio(failure)).resolve(claimed(attempt_count=2))
    assert resolution.status is MessageStatus.DEAD
    assert resolution.dead_reason is DeadReason.ATTEMPTS_EXHAUSTED


async def test_an_unsubscribed_recipient_is_dead_lettered_and_reported_to_routing() -> None:
    refused = SendFailure(ErrorClass.PERMANENT, "unsubscribed", 400, 21610)
    resolution = await delivery(FakeTwilio(refused)).resolve(claimed())
    assert resolution.status is MessageStatus.DEAD
    assert resolution.dead_reason is DeadReason.PERMANENT_ERROR
    subjects = [e.subject for e in resolution.events]
    assert subjects == [DEAD_LETTERED_SUBJECT, RECIPIENT_UNSUBSCRIBED_SUBJECT]
    event = events_pb2.RecipientUnsubscribed.FromString(resolution.events[1].payload)
    assert event.recipient.value == "+33611111111" and event.twilio_error_code == 21610


async def test_an_unknown_outcome_is_never_retried_blindly() -> None:
    lost = SendFailure(ErrorClass.OUTCOME_UNKNOWN, "timed out")
    message = claimed(attempt_count=2)  # even with the attempts used up
    resolution = await delivery(FakeTwilio(lost)).resolve(message)
    assert resolution.status is MessageStatus.PENDING
    assert resolution.reconcile_since == message.claimed_at
    assert resolution.next_attempt_at is not None
    assert resolution.next_attempt_at >= NOW + timedelta(seconds=CONFIG.reconcile_delay_s)


def _listed(sid: str, body: str = "hello") -> TwilioMessageView:
    return TwilioMessageView(sid, "+33611111111", "+14155550100", None, body, NOW)


async def test_reconciliation_adopts_the_message_twilio_already_has() -> None:
    twilio = FakeTwilio(listed=[_listed("SM1")])
    message = claimed(reconcile_since=NOW - timedelta(seconds=30), attempt_count=1)
    resolution = await delivery(twilio).resolve(message)
    assert resolution.status is MessageStatus.SENT and resolution.twilio_sid == "SM1"
    assert twilio.sent == []
    assert [a.outcome for a in resolution.attempts] == [AttemptOutcome.RECONCILED_FOUND]
    assert events_pb2.MessageSent.FromString(resolution.events[0].payload).reconciled


async def test_reconciliation_that_finds_nothing_sends_again() -> None:
    ledger = FakeLedger()
    twilio = FakeTwilio(ACCEPTED, listed=[_listed("SM1", body="another message")])
    message = claimed(reconcile_since=NOW - timedelta(seconds=30), attempt_count=1)
    resolution = await delivery(twilio, ledger=ledger).resolve(message)
    assert resolution.status is MessageStatus.SENT and twilio.sent == [message]
    assert ledger.resends == [message.id]
    outcomes = [a.outcome for a in resolution.attempts]
    assert outcomes == [AttemptOutcome.RECONCILED_NOT_FOUND, AttemptOutcome.ACCEPTED]


async def test_reconciliation_waits_while_an_identical_message_is_mid_send() -> None:
    twilio = FakeTwilio(listed=[_listed("SM1")])
    message = claimed(reconcile_since=NOW - timedelta(seconds=30), attempt_count=1)
    resolution = await delivery(twilio, ledger=FakeLedger(blocked=True)).resolve(message)
    assert resolution.status is MessageStatus.PENDING
    assert resolution.reconcile_since == message.reconcile_since and twilio.sent == []


async def test_a_sid_recorded_for_another_message_is_not_adopted() -> None:
    twilio = FakeTwilio(ACCEPTED, listed=[_listed("SM1")])
    message = claimed(reconcile_since=NOW - timedelta(seconds=30), attempt_count=1)
    ledger = FakeLedger(taken=frozenset({"SM1"}))
    resolution = await delivery(twilio, ledger=ledger).resolve(message)
    assert resolution.twilio_sid == ACCEPTED.twilio_sid and twilio.sent == [message]


async def test_when_twilio_cannot_be_asked_the_outcome_stays_unknown() -> None:
    twilio = FakeTwilio()
    twilio.list_error = "HTTP 503"
    message = claimed(reconcile_since=NOW - timedelta(seconds=30), attempt_count=1)
    resolution = await delivery(twilio).resolve(message)
    assert resolution.status is MessageStatus.PENDING and twilio.sent == []
    assert resolution.reconcile_since == message.reconcile_since
    last = await delivery(twilio).resolve(replace(message, reconcile_failures=2))
    assert last.status is MessageStatus.DEAD
    assert last.dead_reason is DeadReason.OUTCOME_UNKNOWN
    assert last.reconcile_since == message.reconcile_since  # a redrive asks Twilio first


async def test_exhausted_attempts_after_a_clean_reconciliation_dead_letter() -> None:
    twilio = FakeTwilio()
    message = claimed(reconcile_since=NOW - timedelta(seconds=30), attempt_count=3)
    resolution = await delivery(twilio).resolve(message)
    assert resolution.status is MessageStatus.DEAD
    assert resolution.dead_reason is DeadReason.ATTEMPTS_EXHAUSTED and twilio.sent == []


async def test_a_lease_that_ran_out_past_the_deadline_ends_the_message_once_reconciled() -> None:
    # Its worker died mid-send (the lease counts as an attempt): Twilio has nothing, and the
    # message's 15 minutes are over.
    twilio = FakeTwilio(ACCEPTED)
    since = NOW - timedelta(minutes=16)
    late = claimed(
        reconcile_since=since, budget_started_at=since, attempt_count=1, lease_expired=True
    )
    resolution = await delivery(twilio).resolve(late)
    assert resolution.status is MessageStatus.DEAD
    assert resolution.dead_reason is DeadReason.ATTEMPTS_EXHAUSTED and twilio.sent == []
    in_time = replace(late, budget_started_at=NOW - timedelta(minutes=14))
    assert (await delivery(twilio).resolve(in_time)).status is MessageStatus.SENT


async def test_a_window_that_closed_while_retrying_ends_the_message_at_once() -> None:
    twilio = FakeTwilio()
    consent = FakeConsent(
        Consent(opted_out=False, last_inbound_at=NOW - timedelta(hours=24, seconds=1))
    )
    retried = claimed(
        channel=Channel.WHATSAPP,
        sender="whatsapp:+14155550100",
        kind=MessageKind.COMPLIANCE,
        budget_started_at=NOW - timedelta(minutes=10),
        attempt_count=2,
    )
    resolution = await delivery(twilio, consent).resolve(retried)
    assert resolution.status is MessageStatus.DEAD
    assert resolution.dead_reason is DeadReason.OUTSIDE_SESSION_WINDOW and twilio.sent == []
