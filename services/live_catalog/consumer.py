"""The catalog's JetStream consumers; handlers return `Ack`/`Nak`/`Term` as plain values.

- `routing.v1.message.routed` (stream ROUTING_EVENTS, durable `live-catalog`): the routed
  live signals and conversation messages in flight are handed together to
  `CatalogStore.handle_batch` (`Batches`), which applies them in the gateway's received_at
  order, exactly once per MessageSid thanks to its ledger; consent and help messages are
  routing's, not ours.
- `live_session.v1.session.closed` (stream LIVE_SESSION_EVENTS, durable
  `live-catalog-sessions`): the end-of-live summaries, once per session.

The database unreachable, or a concurrent claim of the same client (the unique index on live
reservations refused the second one) -> Nak with a delay growing per delivery; on the last
delivery the message is logged and terminated. An undecodable payload is terminated at once.
After each commit the reply dispatcher is woken.

Logs: one `live_catalog.batch_handled` line per batch (INFO: messages, outcomes tallied,
duration_ms); each message's `live_catalog.inbound_handled` line is DEBUG.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC

import asyncpg
from nats.aio.msg import Msg
from prometheus_client import Counter
from snapsell.live_session.v1 import events_pb2 as session_events
from snapsell.routing.v1 import events_pb2 as routing_events
from snapsell.routing.v1 import routing_pb2

from infra import jetstream
from infra.db import DATABASE_UNAVAILABLE
from infra.jetstream import Ack, ConsumerSpec, Nak, Term
from infra.log import get_logger
from services.live_catalog.domain import Contact, Inbound, ReplyRoute
from services.live_catalog.events import CHANNEL_FROM_PROTO
from services.live_catalog.store import CatalogStore

_log = get_logger(__name__)

ROUTED_SUBJECT = "routing.v1.message.routed"
ROUTED_DURABLE = "live-catalog"
SESSION_CLOSED_SUBJECT = "live_session.v1.session.closed"
SESSIONS_DURABLE = "live-catalog-sessions"

HANDLED = Counter(
    "snapsell_live_catalog_inbound_handled_total",
    "Routed messages handled by the catalog, by outcome (the reply given, ignored, duplicate)",
    ["outcome"],
)

_OURS = frozenset(
    {routing_events.ROUTING_DECISION_LIVE_SIGNAL, routing_events.ROUTING_DECISION_CONVERSATION}
)
_RETRYABLE: tuple[type[BaseException], ...] = (
    *DATABASE_UNAVAILABLE,
    asyncpg.UniqueViolationError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)
_PREFIX = {"whatsapp": "whatsapp:", "messenger": "messenger:"}


def routed_consumer_spec(
    *, ack_wait_s: float, max_deliver: int, max_ack_pending: int
) -> ConsumerSpec:
    return ConsumerSpec(
        stream="ROUTING_EVENTS",
        durable=ROUTED_DURABLE,
        filter_subject=ROUTED_SUBJECT,
        ack_wait_s=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
    )


def sessions_consumer_spec(*, max_deliver: int) -> ConsumerSpec:
    return ConsumerSpec(
        stream="LIVE_SESSION_EVENTS",
        durable=SESSIONS_DURABLE,
        filter_subject=SESSION_CLOSED_SUBJECT,
        ack_wait_s=60.0,
        max_deliver=max_deliver,
    )


def inbound_of(routed: routing_events.MessageRouted) -> Inbound | None:
    """The catalog's view of a routed message; None when it is not the catalog's."""
    message = routed.message
    channel = CHANNEL_FROM_PROTO.get(message.sender.channel)
    if routed.decision not in _OURS or channel is None or not routed.tenant_id:
        return None
    if routed.sender_role not in (routing_pb2.SENDER_ROLE_SELLER, routing_pb2.SENDER_ROLE_CLIENT):
        return None
    if not message.message_sid or not message.HasField("received_at"):
        return None
    session_id = None
    if routed.live_session_id:
        try:
            session_id = uuid.UUID(routed.live_session_id)
        except ValueError:
            return None
    # Answer from where the message came: its Messaging Service, else the business address.
    business = CHANNEL_FROM_PROTO.get(message.recipient.channel)
    prefix = _PREFIX.get(business.value, "") if business is not None else ""
    sender = message.messaging_service_sid or prefix + message.recipient.value
    return Inbound(
        message_sid=message.message_sid,
        tenant_id=routed.tenant_id,
        from_seller=routed.sender_role == routing_pb2.SENDER_ROLE_SELLER,
        session_id=session_id,
        body=message.body,
        received_at=message.received_at.ToDatetime(tzinfo=UTC),
        contact=Contact(channel, message.sender.value),
        route=ReplyRoute(sender, message.account_sid),
    )


class Batches:
    """Gathers the routed messages handled concurrently into batches for
    `CatalogStore.handle_batch`, one batch in its transaction at a time: the messages that
    arrive meanwhile make the next one. Each caller gets its own message's outcome."""

    def __init__(self, store: CatalogStore) -> None:
        self._store = store
        self._waiting: list[tuple[Inbound, asyncio.Future[str]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def submit(self, inbound: Inbound) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.append((inbound, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain(), name="live-catalog-batches")
        return await future

    async def _drain(self) -> None:
        # One turn of the loop first, so the messages of the same fetch join the batch.
        await asyncio.sleep(0)
        while self._waiting:
            batch, self._waiting = self._waiting, []
            started = time.perf_counter()
            try:
                outcomes = await self._store.handle_batch([inbound for inbound, _ in batch])
            except Exception as error:  # e.g. the database unreachable for a batch of one
                outcomes = [error] * len(batch)
            _log_batch(outcomes, started)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its caller was cancelled (shutdown)
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


def _log_batch(outcomes: Sequence[str | Exception], started: float) -> None:
    """The INFO line of a batch: how many messages, how many of each outcome (the reply given,
    `ignored`, `duplicate`; `failed` for an error, retried or given up by its handler) and how
    long it took."""
    tally = collections.Counter(
        "failed" if isinstance(outcome, Exception) else outcome for outcome in outcomes
    )
    _log.info(
        "live_catalog.batch_handled",
        extra={
            "fields": {
                "messages": len(outcomes),
                "outcomes": dict(tally),
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            }
        },
    )


class RoutedConsumer:
    def __init__(
        self, store: CatalogStore, spec: ConsumerSpec, on_commit: Callable[[], None]
    ) -> None:
        self._batches = Batches(store)
        self._spec = spec
        self._on_commit = on_commit

    async def handle(self, msg: Msg) -> jetstream.Decision:
        routed = jetstream.decode(routing_events.MessageRouted, msg.data)
        inbound = inbound_of(routed)
        if inbound is None:
            HANDLED.labels("not_ours").inc()
            return Ack()
        try:
            outcome = await self._batches.submit(inbound)
        except _RETRYABLE as error:
            return _retry_or_give_up(msg, self._spec, inbound.message_sid, error)
        HANDLED.labels(outcome).inc()
        if _log.isEnabledFor(logging.DEBUG):  # the batch has its INFO line
            _log.debug(
                "live_catalog.inbound_handled",
                extra={
                    "fields": {
                        "message_sid": inbound.message_sid,
                        "tenant_id": inbound.tenant_id,
                        "outcome": outcome,
                        "delivery": msg.metadata.num_delivered,
                    }
                },
            )
        self._on_commit()
        return Ack()


class SessionClosedConsumer:
    def __init__(
        self,
        store: CatalogStore,
        spec: ConsumerSpec,
        content_sid_for: Callable[[str], str],
        on_commit: Callable[[], None],
    ) -> None:
        self._store = store
        self._spec = spec
        self._content_sid_for = content_sid_for
        self._on_commit = on_commit

    async def handle(self, msg: Msg) -> jetstream.Decision:
        closed = jetstream.decode(session_events.LiveSessionClosed, msg.data)
        try:
            session_id = uuid.UUID(closed.session_id)
        except ValueError:
            return Term("not a LiveSessionClosed")
        if not closed.tenant_id or not closed.HasField("closed_at"):
            return Term("LiveSessionClosed without tenant_id or closed_at")
        try:
            summarized = await self._store.summarize_session(
                closed.tenant_id,
                session_id,
                started_at=closed.started_at.ToDatetime(tzinfo=UTC),
                closed_at=closed.closed_at.ToDatetime(tzinfo=UTC),
                content_sid=self._content_sid_for(closed.tenant_id),
                correlation=closed.correlation_id,
            )
        except _RETRYABLE as error:
            return _retry_or_give_up(msg, self._spec, closed.session_id, error)
        if summarized is not None:
            _log.info(
                "live_catalog.session_summarized",
                extra={
                    "fields": {
                        "tenant_id": closed.tenant_id,
                        "session_id": closed.session_id,
                        "buyer_summaries": summarized.buyer_summaries,
                        "buyers_skipped_outside_window": summarized.buyers_skipped,
                        "seller_summary": summarized.seller_summary,
                    }
                },
            )
            self._on_commit()
        return Ack()


def _retry_or_give_up(
    msg: Msg, spec: ConsumerSpec, key: str, error: BaseException
) -> jetstream.Decision:
    if jetstream.is_last_delivery(msg, spec):
        HANDLED.labels("deliveries_exhausted").inc()
        _log.error(
            "live_catalog.given_up",
            extra={"fields": {"key": key, "error": str(error) or type(error).__name__}},
        )
        return Term("deliveries exhausted")
    HANDLED.labels("retry").inc()
    delay = jetstream.failure_delay(msg.metadata.num_delivered)
    _log.warning(
        "live_catalog.retry",
        extra={"fields": {"key": key, "retry_in_s": delay, "error": str(error)}},
    )
    return Nak(delay)
