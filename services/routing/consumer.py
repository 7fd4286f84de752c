"""Routing's JetStream consumers: Twilio messages from the gateway routed in batches, carrier
opt-outs from the outbox, and the seller_admin changes that flush the sender cache.

Inbound (`INBOUND`, `gateway.v1.message.received`, durable `routing`): what one fetch brought
(at most `ROUTING_BATCH_SIZE` messages) is decoded and handed to `InboundRouter.route_batch`;
the loop acks each message only after its batch committed. Each message is then settled on
its own outcome:
- a peer down or slow, or the database unreachable -> Nak with a delay growing per delivery;
- undecodable / unusable payload -> recorded in `failed_inbound` + `routing.v1.message.unroutable`,
  then Term (retrying cannot fix it);
- still failing on its last allowed delivery (MaxDeliver) -> recorded the same way (reason
  deliveries_exhausted), then Term: visible and re-publishable, never silently dropped. If even
  that recording fails (database down), the Nak leaves it to JetStream's MAX_DELIVERIES advisory
  and the stream, which keeps the message.
Logs: one `routing.batch_handled` line per batch (INFO: messages, outcomes, duration_ms); one
`routing.inbound_handled` line per message at DEBUG; `routing.inbound_unroutable` (WARNING)
for a message to a `To` no channel owns, with the fix.

Carrier opt-outs (`OUTBOX_EVENTS`, `outbox.v1.recipient.unsubscribed`, durable
`routing-carrier-opt-outs`): Twilio refused a send with error 21610 because the recipient
unsubscribed at the carrier; the opt-out is recorded.

seller_admin changes (`seller_admin.v1.>`, ephemeral): a channel or seller phone changed; the
sender cache is flushed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace
from prometheus_client import Counter, Histogram
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.outbox.v1 import events_pb2 as outbox_events
from snapsell.routing.v1 import events_pb2

from infra import jetstream, telemetry
from infra.convert import timestamp
from infra.db import DATABASE_UNAVAILABLE
from infra.events import record_event
from infra.jetstream import Ack, ConsumerSpec, Nak, Term
from infra.log import get_logger, mask_phone
from services.routing import store
from services.routing.clients import PeerUnavailableError
from services.routing.consent import CHANNEL_FROM_PROTO, apply_consent_change
from services.routing.domain import (
    ConsentChange,
    ConsentSource,
    ConsentState,
    Contact,
    InvalidAddressError,
    RulesBook,
    normalise_address,
)
from services.routing.inbound import (
    MESSAGE_UNROUTABLE,
    Delivery,
    InboundRouter,
    InvalidInboundError,
    Routed,
    RouteOutcome,
    received_at,
)

_log = get_logger(__name__)
_ADDRESS_PREFIXES = {
    address_pb2.CHANNEL_WHATSAPP: "whatsapp:",
    address_pb2.CHANNEL_MESSENGER: "messenger:",
}
tracer = trace.get_tracer(__name__)

INBOUND_DURABLE = "routing"

INBOUND_HANDLED = Counter(
    "snapsell_routing_inbound_handled_total",
    "Inbound stream messages handled, by outcome",
    ["outcome"],
)
INBOUND_LAG = Histogram(
    "snapsell_routing_inbound_lag_seconds",
    "From the gateway receiving a message to routing committing its effects",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
INBOUND_HANDLING = Histogram(
    "snapsell_routing_inbound_handling_seconds",
    "Time to route one batch of inbound stream messages (peers, transaction)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
INBOUND_REDELIVERIES = Counter(
    "snapsell_routing_inbound_redeliveries_total",
    "Inbound stream messages delivered more than once (retries after a failure or a crash)",
)

# The database link failing is a reason to retry, like a peer being down.
_RETRYABLE: tuple[type[BaseException], ...] = (
    PeerUnavailableError,
    *DATABASE_UNAVAILABLE,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


def inbound_consumer_spec(
    *, ack_wait_s: float, max_deliver: int, max_ack_pending: int
) -> ConsumerSpec:
    return ConsumerSpec(
        stream="INBOUND",
        durable=INBOUND_DURABLE,
        filter_subject="gateway.v1.message.received",
        ack_wait_s=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
    )


def retry_delay(num_delivered: int, cap_s: float) -> float:
    """0.5 s, 1 s, 2 s, ... capped: quick when a peer blips, gentle when it is down."""
    return min(cap_s, 0.5 * 2.0 ** min(20, max(0, num_delivered - 1)))


class InboundConsumer:
    def __init__(
        self,
        router: InboundRouter,
        pool: asyncpg.Pool,
        spec: ConsumerSpec,
        *,
        retry_delay_cap_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._router = router
        self._pool = pool
        self._spec = spec
        self._retry_delay_cap_s = retry_delay_cap_s
        self._clock = clock

    async def handle_batch(self, msgs: Sequence[Msg]) -> list[jetstream.Decision]:
        """One decision per message, in order, and one INFO line for the batch: the line of
        each message is DEBUG, so that logging costs per batch, not per message."""
        started = time.perf_counter()
        tally: collections.Counter[str] = collections.Counter()
        decisions: list[jetstream.Decision] = [Ack()] * len(msgs)
        decoded: list[tuple[int, gateway_events.MessageReceived]] = []
        for index, msg in enumerate(msgs):
            if msg.metadata.num_delivered > 1:
                INBOUND_REDELIVERIES.inc()
            try:
                decoded.append((index, jetstream.decode(gateway_events.MessageReceived, msg.data)))
            except jetstream.RejectedEventError as error:
                # Kept in failed_inbound for a redrive once understood, and counted like any poison.
                jetstream.count_rejected(self._spec.durable, error)
                decisions[index] = await self._give_up(msg, None, "undecodable", str(error), tally)
        if not decoded:
            _log_batch(len(msgs), tally, started)
            return decisions
        deliveries = [
            Delivery(
                message,
                msgs[index].metadata.sequence.stream,
                redelivered=msgs[index].metadata.num_delivered > 1,
            )
            for index, message in decoded
        ]
        # One span per batch: a child of its first message's trace, linked to the others'.
        contexts = [telemetry.extract(msgs[index].headers) for index, _ in decoded]
        links = [
            trace.Link(span_context)
            for context in contexts[1:]
            if (span_context := trace.get_current_span(context).get_span_context()).is_valid
        ]
        with tracer.start_as_current_span(
            "routing.route_inbound",
            context=contexts[0],
            kind=trace.SpanKind.CONSUMER,
            links=links,
        ) as span:
            span.set_attribute("messaging.batch.message_count", len(deliveries))
            span.set_attribute("messaging.message.id", decoded[0][1].message_sid)
            with INBOUND_HANDLING.time():
                outcomes = await self._router.route_batch(deliveries)
            for (index, message), outcome in zip(decoded, outcomes, strict=True):
                decisions[index] = await self._settle(msgs[index], message, outcome, tally)
            _log_batch(len(msgs), tally, started)  # in the span: it carries the trace id
        return decisions

    async def _settle(
        self,
        msg: Msg,
        message: gateway_events.MessageReceived,
        outcome: Routed | Exception,
        tally: collections.Counter[str],
    ) -> jetstream.Decision:
        if isinstance(outcome, InvalidInboundError):
            return await self._give_up(msg, message, "undecodable", str(outcome), tally)
        if isinstance(outcome, _RETRYABLE):
            return await self._retry_or_give_up(
                msg, message, str(outcome) or type(outcome).__name__, tally
            )
        if isinstance(outcome, Exception):
            # A bug or an unexpected database error: retry (it may be transient), and on the
            # last delivery record it rather than lose it.
            _log.error(
                "routing.inbound_failed",
                exc_info=outcome,
                extra={"fields": {"message_sid": message.message_sid}},
            )
            reason = f"{type(outcome).__name__}: {outcome}"
            return await self._retry_or_give_up(msg, message, reason, tally)
        INBOUND_HANDLED.labels(outcome.outcome.value).inc()
        tally[outcome.outcome.value] += 1
        if outcome.outcome.value != "duplicate":
            INBOUND_LAG.observe(max(0.0, (self._clock() - received_at(message)).total_seconds()))
        if outcome.outcome is RouteOutcome.UNROUTABLE:
            # A `To` no channel owns: a setup mistake to fix, so its line says how, at any level.
            _log.warning(
                "routing.inbound_unroutable",
                extra={"fields": handled_fields(message, outcome, msg.metadata.num_delivered)},
            )
        elif _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "routing.inbound_handled",
                extra={"fields": handled_fields(message, outcome, msg.metadata.num_delivered)},
            )
        return Ack()

    async def _retry_or_give_up(
        self,
        msg: Msg,
        message: gateway_events.MessageReceived,
        reason: str,
        tally: collections.Counter[str],
    ) -> jetstream.Decision:
        if jetstream.is_last_delivery(msg, self._spec):
            return await self._give_up(msg, message, "deliveries_exhausted", reason, tally)
        INBOUND_HANDLED.labels("retry").inc()
        tally["retry"] += 1
        delay = retry_delay(msg.metadata.num_delivered, self._retry_delay_cap_s)
        _log.warning(
            "routing.inbound_retry",
            extra={
                "fields": {
                    "message_sid": message.message_sid,
                    "delivery": msg.metadata.num_delivered,
                    "retry_in_s": delay,
                    "error": reason,
                }
            },
        )
        return Nak(delay)

    async def _give_up(
        self,
        msg: Msg,
        message: gateway_events.MessageReceived | None,
        reason: str,
        detail: str,
        tally: collections.Counter[str],
    ) -> jetstream.Decision:
        metadata = msg.metadata
        message_sid = message.message_sid if message is not None else ""
        async with self._pool.acquire() as conn, conn.transaction():
            recorded = await store.record_failed_inbound(
                conn,
                stream=metadata.stream,
                stream_sequence=metadata.sequence.stream,
                message_sid=message_sid,
                reason=reason,
                detail=detail,
                deliveries=metadata.num_delivered,
                payload=msg.data,
            )
            if recorded:
                event = events_pb2.MessageUnroutable(
                    reason=(
                        events_pb2.UNROUTABLE_REASON_UNDECODABLE
                        if reason == "undecodable"
                        else events_pb2.UNROUTABLE_REASON_DELIVERIES_EXHAUSTED
                    ),
                    detail=detail[:500],
                    stream_sequence=metadata.sequence.stream,
                    recorded_at=timestamp(self._clock()),
                )
                if message is not None:
                    event.message.CopyFrom(message)
                await record_event(
                    conn,
                    subject=MESSAGE_UNROUTABLE,
                    message=event,
                    aggregate_id=message_sid or f"{metadata.stream}:{metadata.sequence.stream}",
                )
        INBOUND_HANDLED.labels(reason).inc()
        tally[reason] += 1
        _log.error(
            "routing.inbound_given_up",
            extra={
                "fields": {
                    "message_sid": message_sid,
                    "stream_sequence": metadata.sequence.stream,
                    "deliveries": metadata.num_delivered,
                    "reason": reason,
                    "detail": detail,
                }
            },
        )
        return Term(reason)


def _log_batch(messages: int, tally: collections.Counter[str], started: float) -> None:
    """The INFO line of a fetched batch: how many messages, how each was settled (routed,
    duplicate, unroutable, retry, undecodable, deliveries_exhausted) and how long it took."""
    _log.info(
        "routing.batch_handled",
        extra={
            "fields": {
                "messages": messages,
                "outcomes": dict(tally),
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            }
        },
    )


def address_text(address: address_pb2.Address) -> str:
    """An address as Twilio writes it: `whatsapp:+1415...`, `messenger:...`, or a bare number."""
    prefix = _ADDRESS_PREFIXES.get(address.channel, "")
    return f"{prefix}{address.value}"


def handled_fields(
    message: gateway_events.MessageReceived, routed: Routed, delivery: int
) -> dict[str, object]:
    """The line of one message (DEBUG; WARNING when unroutable) that explains what routing
    decided, so ops can follow a MessageSid through the system: who sent it (seller or client),
    the decision and the live signal it was; an unroutable one says which `To` no channel owns
    (masked by the log) and how to fix it."""
    decision = routed.decision
    fields: dict[str, object] = {
        "message_sid": message.message_sid,
        "tenant_id": routed.tenant_id,
        "outcome": routed.outcome.value,
        "sender_role": routed.sender_role.value if routed.sender_role else None,
        "decision": decision.kind.value if decision else None,
        "signal": decision.live_signal.value if decision and decision.live_signal else None,
        "keyword": decision.keyword if decision and decision.keyword else None,
        "live_session_id": routed.touched.session_id if routed.touched else None,
        "delivery": delivery,
    }
    if routed.outcome is RouteOutcome.UNROUTABLE:
        to = mask_phone(address_text(message.recipient))
        fields["to"] = to
        fields["hint"] = f"no channel for {to}; add one with add-channel"
    return fields


CARRIER_OPT_OUT_SUBJECT = "outbox.v1.recipient.unsubscribed"
CARRIER_DURABLE = "routing-carrier-opt-outs"
SELLER_ADMIN_CHANGES = "seller_admin.v1.>"


class CarrierOptOutConsumer:
    """Records an opt-out when Twilio refused a send because the recipient unsubscribed (21610):
    the person told the carrier STOP, so we must stop too. Idempotent: a second delivery finds
    the opt-out already there."""

    def __init__(self, pool: asyncpg.Pool, rules: RulesBook) -> None:
        self._pool = pool
        self._rules = rules

    async def handle(self, msg: Msg) -> jetstream.Decision:
        try:
            event = jetstream.decode(outbox_events.RecipientUnsubscribed, msg.data)
            channel = CHANNEL_FROM_PROTO[event.recipient.channel]
            address = normalise_address(channel, event.recipient.value)
        except (KeyError, InvalidAddressError) as error:
            _log.error("routing.carrier_opt_out_invalid", extra={"fields": {"error": str(error)}})
            return Term("invalid RecipientUnsubscribed")
        if not event.tenant_id:
            return Term("RecipientUnsubscribed without tenant_id")
        occurred = (
            event.occurred_at.ToDatetime(tzinfo=UTC)
            if event.HasField("occurred_at")
            else datetime.now(UTC)
        )
        change = ConsentChange(
            contact=Contact(event.tenant_id, channel, address),
            state=ConsentState.OPTED_OUT,
            effective_at=occurred,
            source=ConsentSource.CARRIER,
            actor="outbox",
            message_sid=event.message_id,
            reason=f"twilio error {event.twilio_error_code} sending from {event.sender}",
            tenant_scope=self._rules.for_tenant(event.tenant_id).consent_scope,
        )
        async with self._pool.acquire() as conn, conn.transaction():
            outcome = await apply_consent_change(conn, change)
        _log.info(
            "routing.carrier_opt_out",
            extra={"fields": {"tenant_id": event.tenant_id, "outcome": outcome.value}},
        )
        return Ack()


def carrier_consumer_spec() -> ConsumerSpec:
    return ConsumerSpec(
        stream="OUTBOX_EVENTS",
        durable=CARRIER_DURABLE,
        filter_subject=CARRIER_OPT_OUT_SUBJECT,
        max_deliver=1000,
    )


async def follow_changes(
    js: JetStreamContext,
    invalidate: Callable[[], None],
    stop: asyncio.Event,
    *,
    subject: str = SELLER_ADMIN_CHANGES,
) -> None:
    """Flush the sender cache on every seller_admin event (after a NATS outage the cache TTL
    bounds staleness)."""

    async def on_event(_msg: Msg) -> None:
        invalidate()

    await jetstream.follow_new_events(js, subject, on_event, invalidate, stop)
