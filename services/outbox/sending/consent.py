"""The consent step of the sending pipeline: routing, which owns the consent ledger, is asked
about recipients before each send (through `clients.RoutingConsentChecker`).

A claimed batch is checked with one `routing.CheckOptOuts` call (`BatchConsent.ask`), not one
call per message: per message, the RPC cost routing and the outbox more CPU than the send.
No send is decided on an answer older than `OUTBOX_CONSENT_MAX_AGE_SECONDS`: the pipeline asks
again, in batches, for messages still waiting once their answer is half that old
(`refresh_consent`), and `BatchConsent.for_send` asks again for a message alone when its
answer is older anyway, so an opt-out is never honoured later than that.

The bound: routing answers from its consent ledger (no cache), so a STOP committed before an
answer was asked blocks every send decided on it; a message is therefore never sent once its
recipient's STOP has been committed for longer than `OUTBOX_CONSENT_MAX_AGE_SECONDS` (1 s by
default), plus the time of the send request itself
(tests/integration/outbox/test_batch_consent.py proves it with routing's real ledger).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext
from prometheus_client import Counter

from infra import telemetry
from infra.events import wait_any
from infra.log import get_logger
from services.outbox.clients import ConsentChecker, ConsentUnavailableError, Recipient
from services.outbox.domain import ClaimedMessage, Consent

CONSENT_RECHECKS = Counter(
    "snapsell_outbox_consent_rechecks_total",
    "Consent asked again for one message whose batch answer grew too old before its send",
)

_log = get_logger(__name__)
_tracer = trace.get_tracer(__name__)


@dataclass(frozen=True, slots=True)
class ConsentAnswer:
    """Routing's answer about one claimed message's recipient, and when it was asked."""

    # None: routing could not answer (the message waits).
    consent: Consent | None
    asked_at: float
    # The batch check's span when tracing is on: each send span links to it.
    span: SpanContext | None = None


def _recipient(message: ClaimedMessage) -> Recipient:
    return (message.tenant_id, message.channel, message.recipient)


def _enqueuer_link(message: ClaimedMessage) -> Link | None:
    if not message.traceparent:
        return None
    context = trace.get_current_span(telemetry.extract({"traceparent": message.traceparent}))
    span_context = context.get_span_context()
    return Link(span_context) if span_context.is_valid else None


class BatchConsent:
    """Consent for claimed batches, fresh enough at each send."""

    def __init__(
        self,
        checker: ConsentChecker,
        *,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checker = checker
        self._max_age_s = max_age_s
        self._clock = clock

    async def ask(self, messages: Sequence[ClaimedMessage]) -> dict[uuid.UUID, ConsentAnswer]:
        """One check for the whole batch. Never raises: when routing cannot answer, every
        answer says so and each message waits."""
        if not messages:
            return {}
        if not telemetry.tracing_enabled():
            return await self._ask(messages, None)
        # One span for many messages: it links to each message's trace (the enqueuer's span),
        # and each message's send span links back to it.
        links = [link for m in messages if (link := _enqueuer_link(m)) is not None]
        with _tracer.start_as_current_span(
            "outbox.check_consent", links=links, attributes={"snapsell.messages": len(messages)}
        ) as span:
            return await self._ask(messages, span.get_span_context())

    async def _ask(
        self, messages: Sequence[ClaimedMessage], span: SpanContext | None
    ) -> dict[uuid.UUID, ConsentAnswer]:
        asked_at = self._clock()
        try:
            consents: Sequence[Consent | None] = await self._checker.check_many(
                [_recipient(m) for m in messages]
            )
        except ConsentUnavailableError as error:
            _log.warning("outbox.consent_unavailable", extra={"fields": {"error": str(error)}})
            consents = [None] * len(messages)
        except Exception:  # a bug must not strand the claimed batch; it waits and is retried
            _log.exception("outbox.consent_check_crashed")
            consents = [None] * len(messages)
        return {
            m.id: ConsentAnswer(consent, asked_at, span)
            for m, consent in zip(messages, consents, strict=True)
        }

    async def for_send(self, message: ClaimedMessage, answer: ConsentAnswer | None) -> Consent:
        """The consent to decide this send on: the batch's answer while it is fresh, else a
        new check of this message alone. ConsentUnavailableError: the message waits."""
        if answer is not None:
            if answer.consent is None:
                raise ConsentUnavailableError("routing could not answer the batch check")
            if self._clock() - answer.asked_at <= self._max_age_s:
                return answer.consent
            CONSENT_RECHECKS.inc()
        [consent] = await self._checker.check_many([_recipient(message)])
        return consent


class Waiting(Protocol):
    """A claimed message waiting for its send slot (see leases.Held)."""

    message: ClaimedMessage
    consent: ConsentAnswer | None
    started: bool
    lost: bool


class ConsentReader(Protocol):
    """What `refresh_consent` asks (see send.MessageDelivery.check_consent)."""

    async def check_consent(
        self, messages: Sequence[ClaimedMessage]
    ) -> Mapping[uuid.UUID, ConsentAnswer]: ...


async def refresh_consent(
    held: Mapping[uuid.UUID, Waiting],
    consent: ConsentReader,
    max_age_s: float,
    batch: int,
    stop: asyncio.Event,
) -> None:
    """Ask again, in batches, for the consent of messages still waiting for a slot once their
    answer is half `max_age_s` old: when sends fall behind (a rate limit, a busy machine) the
    answers stay fresh without one call per message at send time."""
    while not stop.is_set():
        await wait_any(stop, timeout_s=max_age_s / 4)
        now = time.monotonic()
        aged = [
            h
            for h in held.values()
            if not h.started
            and not h.lost
            and h.consent is not None
            and now - h.consent.asked_at > max_age_s / 2
        ]
        try:
            for start in range(0, len(aged), batch):
                chunk = aged[start : start + batch]
                answers = await consent.check_consent([h.message for h in chunk])
                for entry in chunk:
                    entry.consent = answers.get(entry.message.id, entry.consent)
        except Exception:  # a bug must not stop the refresh; each send then asks on its own
            _log.exception("outbox.consent_refresh_crashed")
