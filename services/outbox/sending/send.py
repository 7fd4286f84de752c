"""One claimed message, start to end: settle an earlier unknown outcome, check consent and the
WhatsApp window, send, and turn what happened into a `Resolution` for the batch writer.

Order matters: reconciliation comes first (a message Twilio already has must not be sent
again, whatever else changed), consent comes right before the send: the answer its claimed
batch got, or a new one when that grew too old meanwhile (see consent.BatchConsent).
What each end records is built by `resolutions.py`.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from prometheus_client import Counter, Histogram

from infra import telemetry
from services.outbox.clients import ConsentUnavailableError
from services.outbox.config import WorkerConfig
from services.outbox.domain import (
    AttemptOutcome,
    AttemptRecord,
    ClaimedMessage,
    DeadReason,
    ErrorClass,
    PreSendDecision,
    Resolution,
    SendAccepted,
    SendResult,
    decide_before_send,
)
from services.outbox.metrics import observe_accepted
from services.outbox.sending import resolutions
from services.outbox.sending.consent import BatchConsent, ConsentAnswer
from services.outbox.sending.reconcile import ExpectedSend, TwilioMessageView, find_reconciled_send
from services.outbox.sending.twilio_api import ReconciliationError

SEND_RESULTS = Counter(
    "snapsell_outbox_send_results_total", "Twilio send attempts by result class", ["result"]
)
SEND_SECONDS = Histogram(
    "snapsell_outbox_send_seconds",
    "Time Twilio took to answer a send",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
RECONCILIATIONS = Counter(
    "snapsell_outbox_reconciliations_total",
    "Unknown outcomes settled by listing Twilio's messages, by result",
    ["result"],
)
CONSENT_UNAVAILABLE = Counter(
    "snapsell_outbox_consent_unavailable_total",
    "Sends postponed because routing could not answer a consent check",
)
_RESULT_COUNTERS = {c: SEND_RESULTS.labels(c.value) for c in ErrorClass}
_ACCEPTED = SEND_RESULTS.labels("accepted")

_WINDOW_MESSAGE = "free-form WhatsApp message and no inbound message in the last 24 hours"

_log = logging.getLogger(__name__)


class TwilioGateway(Protocol):
    """What delivery needs of Twilio (see twilio_api.TwilioSender)."""

    async def send(self, message: ClaimedMessage) -> SendResult: ...

    async def recent_messages(
        self, message: ClaimedMessage, since: datetime, clock_skew: timedelta
    ) -> list[TwilioMessageView]: ...


class ReconcileLedger(Protocol):
    """What reconciliation needs of the store (see store.OutboxStore)."""

    async def reconcile_check(
        self, message: ClaimedMessage, candidate_sids: Sequence[str]
    ) -> tuple[bool, frozenset[str]]: ...

    async def start_resend(self, worker_id: str, message_id: uuid.UUID) -> bool: ...


class LeaseLostError(Exception):
    """Another worker holds the message now; this claim must record nothing."""


# The send span's context while a message is resolved (each message runs in its own task).
_SPAN_TRACEPARENT: ContextVar[str | None] = ContextVar("outbox_span_traceparent", default=None)
_tracer = trace.get_tracer(__name__)


def _event_traceparent(message: ClaimedMessage) -> str | None:
    """Events join the send span's trace when there is one, else the enqueuer's."""
    return _SPAN_TRACEPARENT.get() or message.traceparent


def utc_now() -> datetime:
    return datetime.now(UTC)


class MessageDelivery:
    def __init__(
        self,
        store: ReconcileLedger,
        sender: TwilioGateway,
        consent: BatchConsent,
        config: WorkerConfig,
        worker_id: str,
        *,
        now: Callable[[], datetime] = utc_now,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._sender = sender
        self._consent = consent
        self._config = config
        self._worker_id = worker_id
        self._now = now
        self._jitter = jitter
        self._window = timedelta(seconds=config.whatsapp_window_s)
        self._skew = timedelta(seconds=config.reconcile_clock_skew_s)

    async def check_consent(
        self, messages: Sequence[ClaimedMessage]
    ) -> Mapping[uuid.UUID, ConsentAnswer]:
        """Consent for a claimed batch, in one check; pass each answer to `resolve`."""
        return await self._consent.ask(messages)

    async def resolve(
        self, message: ClaimedMessage, consent: ConsentAnswer | None = None
    ) -> Resolution:
        """The outcome of one claim (`consent`: its batch's answer, None to ask now); a span
        `outbox.send` (child of the enqueuer's trace, linked to the batch's consent check) when
        tracing is on, and the events recorded carry that span's context."""
        if not telemetry.tracing_enabled():
            return await self._resolve(message, consent)
        parent = telemetry.extract(
            {"traceparent": message.traceparent} if message.traceparent else None
        )
        attributes = {
            "snapsell.message_id": str(message.id),
            "snapsell.tenant_id": message.tenant_id,
        }
        links = [Link(consent.span)] if consent is not None and consent.span else []
        with _tracer.start_as_current_span(
            "outbox.send",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            links=links,
        ) as span:
            carrier: dict[str, str] = {}
            telemetry.inject(carrier)
            _SPAN_TRACEPARENT.set(carrier.get("traceparent"))
            resolution = await self._resolve(message, consent)
            span.set_attribute("snapsell.outbox.status", resolution.status.value)
            return resolution

    async def _resolve(self, message: ClaimedMessage, answer: ConsentAnswer | None) -> Resolution:
        prior: tuple[AttemptRecord, ...] = ()
        if message.reconcile_since is not None:
            settled = await self._reconcile(message)
            if isinstance(settled, Resolution):
                return settled
            prior = (settled,)
        if message.attempt_count >= message.max_attempts:
            return self._dead(message, DeadReason.ATTEMPTS_EXHAUSTED, prior, None)
        try:
            consent = await self._consent.for_send(message, answer)
        except ConsentUnavailableError:
            CONSENT_UNAVAILABLE.inc()
            due_at = self._now() + timedelta(seconds=self._config.consent_retry_s)
            return resolutions.later(message, due_at=due_at, attempts=prior)
        now = self._now()
        decision = decide_before_send(
            kind=message.kind,
            channel=message.channel,
            is_template=message.is_template,
            consent=consent,
            now=now,
            window=self._window,
        )
        if decision is PreSendDecision.BLOCK_OPTED_OUT:
            # The decision a shop asks about ("why did my client get nothing?"), in one line.
            _log.info(
                "outbox.blocked_opted_out",
                extra={
                    "fields": {
                        "message_id": str(message.id),
                        "tenant_id": message.tenant_id,
                        "to": message.to,
                        "opted_out_since": str(consent.opted_out_at),
                    }
                },
            )
            return resolutions.blocked(
                message,
                opted_out_since=consent.opted_out_at,
                at=now,
                attempts=prior,
                traceparent=_event_traceparent(message),
            )
        if decision is PreSendDecision.DEAD_OUTSIDE_WINDOW:
            return self._dead(message, DeadReason.OUTSIDE_SESSION_WINDOW, prior, _WINDOW_MESSAGE)
        return await self._send(message, prior)

    async def _send(self, message: ClaimedMessage, prior: tuple[AttemptRecord, ...]) -> Resolution:
        started = self._now()
        result = await self._sender.send(message)
        finished = self._now()
        SEND_SECONDS.observe((finished - started).total_seconds())
        if isinstance(result, SendAccepted):
            _ACCEPTED.inc()
            self._observe_accepted(message, finished)
            attempt = AttemptRecord(
                AttemptOutcome.ACCEPTED,
                started,
                finished,
                result.http_status,
                twilio_sid=result.twilio_sid,
            )
            return resolutions.sent(
                message,
                twilio_sid=result.twilio_sid,
                twilio_status=result.twilio_status,
                attempts=(*prior, attempt),
                attempt_increment=1,
                sent_at=finished,
                reconciled=False,
                traceparent=_event_traceparent(message),
            )
        _RESULT_COUNTERS[result.error_class].inc()
        return resolutions.after_failure(
            message,
            result,
            (*prior, resolutions.failed_attempt(result, started, finished)),
            retry=self._config.retry,
            reconcile_delay_s=self._config.reconcile_delay_s,
            now=finished,
            jitter=self._jitter(),
            traceparent=_event_traceparent(message),
        )

    async def _reconcile(self, message: ClaimedMessage) -> Resolution | AttemptRecord:
        """Ask Twilio whether an earlier attempt was accepted. A Resolution when that settles
        the claim (found, postponed, Twilio unreadable), else the not-found record: the caller
        goes on to send."""
        since = message.reconcile_since
        assert since is not None
        started = self._now()
        try:
            candidates = await self._sender.recent_messages(message, since, self._skew)
        except ReconciliationError as error:
            RECONCILIATIONS.labels("failed").inc()
            attempt = AttemptRecord(
                AttemptOutcome.OUTCOME_UNKNOWN,
                started,
                self._now(),
                error_message=f"could not list Twilio messages: {error}"[:300],
            )
            return resolutions.reconcile_failed(
                message,
                str(error),
                attempt,
                retry=self._config.retry,
                reconcile_delay_s=self._config.reconcile_delay_s,
                now=self._now(),
                jitter=self._jitter(),
                traceparent=_event_traceparent(message),
            )
        blocked, taken = await self._store.reconcile_check(message, [c.sid for c in candidates])
        if blocked:
            # An identical message is mid-send; its Twilio SID must be recorded first.
            RECONCILIATIONS.labels("postponed").inc()
            due_at = self._now() + timedelta(seconds=self._config.reconcile_delay_s)
            return resolutions.later(message, due_at=due_at, keep_reconcile=True)
        expected = ExpectedSend(
            to=message.to, sender=message.sender, body=message.body, since=since
        )
        found = find_reconciled_send(candidates, expected, taken_sids=taken, clock_skew=self._skew)
        finished = self._now()
        if found is not None:
            RECONCILIATIONS.labels("found").inc()
            self._observe_accepted(message, found.date_created or finished)
            attempt = AttemptRecord(
                AttemptOutcome.RECONCILED_FOUND,
                started,
                finished,
                twilio_sid=found.sid,
                error_message=f"matched 1 of {len(candidates)} listed by to, from, body, date",
            )
            return resolutions.sent(
                message,
                twilio_sid=found.sid,
                twilio_status="queued",
                attempts=(attempt,),
                attempt_increment=0,
                sent_at=found.date_created or finished,
                reconciled=True,
                traceparent=_event_traceparent(message),
            )
        RECONCILIATIONS.labels("not_found").inc()
        if not await self._store.start_resend(self._worker_id, message.id):
            raise LeaseLostError(str(message.id))
        return AttemptRecord(
            AttemptOutcome.RECONCILED_NOT_FOUND,
            started,
            finished,
            error_message=f"none of {len(candidates)} listed matched; safe to send",
        )

    def _observe_accepted(self, message: ClaimedMessage, accepted_at: datetime) -> None:
        classes = self._config.tenant_classes
        observe_accepted(classes, message.tenant_id, message.kind.value, message.id, accepted_at)

    def _dead(
        self,
        message: ClaimedMessage,
        reason: DeadReason,
        attempts: tuple[AttemptRecord, ...],
        error_message: str | None,
    ) -> Resolution:
        """Dead before any send of this claim (no attempt used)."""
        return resolutions.dead(
            message,
            reason=reason,
            attempts=attempts,
            attempt_increment=0,
            error_code=None,
            error_message=error_message,
            at=self._now(),
            traceparent=_event_traceparent(message),
        )
