"""What routing consumes from other contexts' event streams.

- `outbox.v1.recipient.unsubscribed` (durable `routing-carrier-opt-outs`): Twilio refused a send
  with error 21610 because the recipient unsubscribed at the carrier; record the opt-out.
- `seller_admin.v1.>` (ephemeral): a channel or seller phone changed; flush the sender cache.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from snapsell.outbox.v1 import events_pb2 as outbox_events

from infra import jetstream
from infra.jetstream import Ack, ConsumerSpec, Term
from infra.log import get_logger
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

_log = get_logger(__name__)

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
            event = outbox_events.RecipientUnsubscribed.FromString(msg.data)
            channel = CHANNEL_FROM_PROTO[event.recipient.channel]
            address = normalise_address(channel, event.recipient.value)
        except (DecodeError, KeyError, InvalidAddressError) as error:
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
    """Flush the sender cache on every seller_admin event (an ephemeral ordered consumer that
    sees only new events; after a NATS outage the cache TTL bounds staleness)."""
    while not stop.is_set():
        try:
            subscription = await js.subscribe(
                subject,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.NEW,
                cb=_invalidating(invalidate),
            )
            try:
                await stop.wait()
            finally:
                await subscription.unsubscribe()
        except Exception as error:
            _log.warning(
                "routing.seller_admin_follow_failed", extra={"fields": {"error": str(error)}}
            )
            invalidate()
            await _sleep_unless(stop, 2.0)


def _invalidating(invalidate: Callable[[], None]) -> Callable[[Msg], Awaitable[None]]:
    async def on_event(_msg: Msg) -> None:
        invalidate()

    return on_event


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
