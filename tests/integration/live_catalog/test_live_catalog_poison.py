"""Poison events on the catalog's two consumers, on a real NATS JetStream and PostgreSQL: an
undecodable event, an unknown enum value and a payload over the size limit are terminated and
counted at once, and the good event behind them is handled."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.live_session.v1 import events_pb2 as session_events
from snapsell.routing.v1 import events_pb2 as routing_events
from snapsell.routing.v1 import routing_pb2

from infra import jetstream
from infra.jetstream import ConsumerSpec, Handler, StreamSpec
from services.live_catalog.consumer import (
    HANDLED,
    RoutedConsumer,
    SessionClosedConsumer,
    routed_consumer_spec,
    sessions_consumer_spec,
)
from services.live_catalog.store import CatalogStore
from tests.support.jetstream import wait_settled
from tests.support.poison import (
    UNKNOWN_ENUM,
    assert_nothing_pending,
    increase,
    publish_poison,
    rejected,
)


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    client = await jetstream.connect(nats_url, name="live-catalog-test")
    yield client.jetstream()
    await client.close()


@pytest.fixture
async def stream(js: JetStreamContext) -> AsyncIterator[str]:
    name = f"LC{uuid.uuid4().hex[:8].upper()}"
    await jetstream.ensure_stream(js, StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    yield name
    await js.delete_stream(name)


def handled() -> float:
    """Routed messages the catalog handled as its own (not skipped as another's)."""
    return sum(
        sample.value
        for sample in HANDLED.collect()[0].samples
        if sample.name.endswith("_total") and sample.labels["outcome"] != "not_ours"
    )


def timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


async def consume_after_poison(
    js: JetStreamContext,
    production: ConsumerSpec,
    stream: str,
    handler: Handler,
    *,
    unknown_enum: bytes,
    good: bytes,
) -> dict[str, float]:
    """Poison then `good` on the stream, consumed as in production (its consumer settings, its
    loop); the rejections this counted."""
    subject = f"{stream.lower()}.{production.filter_subject}"
    spec = dataclasses.replace(production, stream=stream, filter_subject=subject)
    before = rejected(spec.durable)
    await publish_poison(js, subject, unknown_enum, "poison")
    await jetstream.publish(js, subject, good, msg_id="good")
    stop = asyncio.Event()
    loop = asyncio.create_task(jetstream.run_pull_consumer(js, spec, handler, stop=stop))
    try:
        await wait_settled(js, stream, spec.durable, subject, timeout_s=15)
    finally:
        stop.set()
        await loop
    await assert_nothing_pending(js, stream, spec.durable)
    return increase(before, rejected(spec.durable))


async def test_poison_routed_messages_are_terminated_and_counted(
    js: JetStreamContext, stream: str, store: CatalogStore, pool: asyncpg.Pool, tenant: str
) -> None:
    def routed(decision: int) -> routing_events.MessageRouted:
        return routing_events.MessageRouted(
            tenant_id=tenant,
            sender_role=routing_pb2.SENDER_ROLE_CLIENT,
            decision=decision,  # type: ignore[arg-type]
            message=gateway_events.MessageReceived(
                message_sid=f"SM{uuid.uuid4().hex}",
                account_sid="AC" + "1" * 32,
                sender=address_pb2.Address(
                    channel=address_pb2.CHANNEL_WHATSAPP, value="+33611111111"
                ),
                recipient=address_pb2.Address(
                    channel=address_pb2.CHANNEL_WHATSAPP, value="+14155238886"
                ),
                body="hello",
                received_at=timestamp(datetime.now(UTC)),
            ),
        )

    good = routed(routing_events.ROUTING_DECISION_CONVERSATION)
    handled_before = handled()
    spec = routed_consumer_spec(ack_wait_s=30, max_deliver=5, max_ack_pending=100)
    counted = await consume_after_poison(
        js,
        spec,
        stream,
        RoutedConsumer(store, spec, lambda: None).handle,
        unknown_enum=routed(UNKNOWN_ENUM).SerializeToString(),
        good=good.SerializeToString(),
    )
    assert counted == {"undecodable": 1, "unknown_enum": 1}
    assert handled() - handled_before == 1


async def test_poison_session_closings_are_terminated_and_counted(
    js: JetStreamContext, stream: str, store: CatalogStore, pool: asyncpg.Pool, tenant: str
) -> None:
    def closed(reason: int) -> session_events.LiveSessionClosed:
        now = datetime.now(UTC)
        return session_events.LiveSessionClosed(
            tenant_id=tenant,
            session_id=str(uuid.uuid4()),
            reason=reason,  # type: ignore[arg-type]
            started_at=timestamp(now - timedelta(hours=1)),
            closed_at=timestamp(now),
        )

    good = closed(1)
    spec = sessions_consumer_spec(max_deliver=5)
    counted = await consume_after_poison(
        js,
        spec,
        stream,
        SessionClosedConsumer(store, spec, lambda _: "", lambda: None).handle,
        unknown_enum=closed(UNKNOWN_ENUM).SerializeToString(),
        good=good.SerializeToString(),
    )
    assert counted == {"undecodable": 1, "unknown_enum": 1}
    assert (
        await pool.fetchval("SELECT id::text FROM sessions WHERE status = 'closed'")
        == good.session_id
    )
