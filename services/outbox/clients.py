"""Asking routing, which owns the consent ledger, about recipients before sending.

A claimed batch is checked with one `routing.CheckOptOuts` call (`BatchConsent.ask`), not one
call per message: per message, the RPC cost routing and the outbox more CPU than the send.
No send is decided on an answer older than `OUTBOX_CONSENT_MAX_AGE_SECONDS`: the worker asks
again, in batches, for messages still waiting once their answer is half that old
(`held.refresh_consent`), and `BatchConsent.for_send` asks again for a message alone when its
answer is older anyway, so an opt-out is never honoured later than that.

The channel is leaner than `infra.grpc_client.service_channel`: same options (retry on
UNAVAILABLE, keepalive), but the service token goes in each call's metadata instead of through
a client interceptor. Tracing interceptors are kept when tracing is on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext
from prometheus_client import Counter
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc

from infra import telemetry
from infra.auth import TokenProvider
from infra.grpc_client import CHANNEL_OPTIONS
from infra.log import get_logger
from infra.telemetry import grpc_client_interceptors
from services.outbox.domain import Channel, Consent
from services.outbox.events import CHANNEL_TO_PROTO
from services.outbox.records import ClaimedMessage

# Routing's documented limit on checks per CheckOptOuts call.
MAX_CHECKS_PER_CALL = 1000

CONSENT_RECHECKS = Counter(
    "snapsell_outbox_consent_rechecks_total",
    "Consent asked again for one message whose batch answer grew too old before its send",
)

# (tenant, channel, address): what one check asks about.
Recipient = tuple[str, Channel, str]

_log = get_logger(__name__)
_tracer = trace.get_tracer(__name__)


class ConsentUnavailableError(Exception):
    """Routing could not answer; the message waits (it is neither sent nor blocked)."""


class ConsentChecker(Protocol):
    async def check_many(self, recipients: Sequence[Recipient]) -> list[Consent]:
        """One answer per recipient, in order; ConsentUnavailableError when routing fails."""
        ...


def routing_channel(addr: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        addr, options=list(CHANNEL_OPTIONS), interceptors=grpc_client_interceptors() or None
    )


def _moment(stamp: Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if present else None


# Most answers: never opted out, no inbound message on record (immutable, so shared).
_NOTHING_ON_RECORD = Consent(opted_out=False)


def _consent(reply: routing_pb2.CheckOptOutResponse) -> Consent:
    if not reply.ListFields():
        return _NOTHING_ON_RECORD
    return Consent(
        opted_out=reply.opted_out,
        opted_out_at=_moment(reply.opted_out_at, reply.HasField("opted_out_at")),
        last_inbound_at=_moment(reply.last_inbound_at, reply.HasField("last_inbound_at")),
    )


class RoutingConsentChecker:
    """`routing.CheckOptOuts` (UNAVAILABLE is retried by the channel's service config). A
    recipient asked twice in one batch is asked once; batches over routing's limit are split
    into calls made together."""

    def __init__(
        self, channel: grpc.aio.Channel, tokens: TokenProvider, *, timeout_s: float
    ) -> None:
        self._stub = routing_pb2_grpc.RoutingServiceStub(channel)
        self._tokens = tokens
        self._timeout_s = timeout_s
        self._metadata: tuple[str, tuple[tuple[str, str], ...]] = ("", ())

    async def check_many(self, recipients: Sequence[Recipient]) -> list[Consent]:
        distinct = list(dict.fromkeys(recipients))
        chunks = [
            distinct[i : i + MAX_CHECKS_PER_CALL]
            for i in range(0, len(distinct), MAX_CHECKS_PER_CALL)
        ]
        answers = await asyncio.gather(*(self._ask(chunk) for chunk in chunks))
        by_recipient = {
            key: consent
            for chunk, chunk_answers in zip(chunks, answers, strict=True)
            for key, consent in zip(chunk, chunk_answers, strict=True)
        }
        return [by_recipient[key] for key in recipients]

    async def _ask(self, recipients: Sequence[Recipient]) -> list[Consent]:
        request = routing_pb2.CheckOptOutsRequest()
        add = request.checks.add
        for tenant, channel, value in recipients:
            # The nested address as a dict is built in place (no message built apart, copied).
            add(tenant_id=tenant, address={"channel": CHANNEL_TO_PROTO[channel], "value": value})
        token = self._tokens.token()
        if token != self._metadata[0]:  # renewed about once an hour
            self._metadata = (token, (("authorization", f"Bearer {token}"),))
        try:
            reply = await self._stub.CheckOptOuts(
                request, metadata=self._metadata[1], timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise ConsentUnavailableError(
                f"routing CheckOptOuts failed: {error.code().name} {error.details()}"
            ) from error
        if len(reply.results) != len(recipients):
            raise ConsentUnavailableError(
                f"routing answered {len(reply.results)} checks of {len(recipients)}"
            )
        return [_consent(result) for result in reply.results]


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
