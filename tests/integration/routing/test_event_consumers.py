"""What routing consumes from other contexts, on a real NATS JetStream and PostgreSQL: carrier
opt-outs reported by the outbox (Twilio 21610) and seller_admin changes flushing the cache."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from snapsell.outbox.v1 import events_pb2 as outbox_events
from snapsell.routing.v1 import events_pb2, routing_pb2

from infra import jetstream
from infra.jetstream import ConsumerSpec, StreamSpec
from services.routing import store
from services.routing.consent import apply_consent_change
from services.routing.consumer import CarrierOptOutConsumer, follow_changes
from services.routing.domain import (
    Channel,
    ConsentChange,
    ConsentSource,
    ConsentState,
    Contact,
    RulesBook,
)
from tests.integration.routing.fakes import whatsapp
from tests.support.jetstream import wait_settled
from tests.support.poison import (
    UNKNOWN_ENUM,
    assert_nothing_pending,
    increase,
    publish_poison,
    rejected,
)

CLIENT = Contact("shop-1", Channel.WHATSAPP, "+33622222222")


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    client = await jetstream.connect(nats_url, name="routing-test")
    yield client.jetstream()
    await client.close()


@pytest.fixture
async def stream(js: JetStreamContext) -> AsyncIterator[str]:
    name = f"RE{uuid.uuid4().hex[:8].upper()}"
    await jetstream.ensure_stream(js, StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    yield name
    await js.delete_stream(name)


def unsubscribed(at: datetime, message_id: str = "m-1") -> bytes:
    occurred = Timestamp()
    occurred.FromDatetime(at)
    return outbox_events.RecipientUnsubscribed(
        tenant_id=CLIENT.tenant_id,
        sender="whatsapp:+14155238886",
        recipient=whatsapp(CLIENT.address),
        message_id=message_id,
        twilio_error_code=21610,
        occurred_at=occurred,
    ).SerializeToString()


async def consume(js: JetStreamContext, pool: asyncpg.Pool, stream: str, *payloads: bytes) -> None:
    subject = f"{stream.lower()}.recipient.unsubscribed"
    for index, payload in enumerate(payloads):
        await jetstream.publish(js, subject, payload, msg_id=f"e{index}")
    spec = ConsumerSpec(stream=stream, durable="carrier", filter_subject=subject)
    await jetstream.ensure_consumer(js, spec)
    stop = asyncio.Event()
    loop = asyncio.create_task(
        jetstream.run_pull_consumer(
            js, spec, CarrierOptOutConsumer(pool, RulesBook()).handle, stop=stop
        )
    )
    await wait_settled(js, stream, "carrier", subject, timeout_s=15)
    stop.set()
    await loop


async def test_a_carrier_refusal_records_the_opt_out_once(
    js: JetStreamContext, clean: asyncpg.Pool, stream: str
) -> None:
    at = datetime.now(UTC)
    await consume(js, clean, stream, unsubscribed(at), unsubscribed(at), b"\xff garbage")
    status = await store.consent_status(clean, CLIENT)
    assert status.opted_out_at is not None
    [payload] = [
        row["payload"]
        for row in await clean.fetch(
            "SELECT payload FROM events WHERE subject = 'routing.v1.opt_out.recorded'"
        )
    ]
    event = events_pb2.OptOutChanged.FromString(payload)
    assert event.source == routing_pb2.CONSENT_SOURCE_CARRIER and event.message_sid == "m-1"


async def test_a_carrier_refusal_older_than_a_start_does_not_opt_out_again(
    js: JetStreamContext, clean: asyncpg.Pool, stream: str
) -> None:
    now = datetime.now(UTC)
    async with clean.acquire() as conn, conn.transaction():
        await apply_consent_change(
            conn,
            ConsentChange(CLIENT, ConsentState.OPTED_IN, now, ConsentSource.KEYWORD, "routing"),
        )
    await consume(js, clean, stream, unsubscribed(now - timedelta(minutes=1)))
    assert (await store.consent_status(clean, CLIENT)).opted_out_at is None


async def test_any_seller_admin_event_flushes_the_sender_cache(
    js: JetStreamContext, stream: str
) -> None:
    flushed = asyncio.Event()
    stop = asyncio.Event()
    follower = asyncio.create_task(
        follow_changes(js, flushed.set, stop, subject=f"{stream.lower()}.>")
    )
    await asyncio.sleep(0.5)  # subscribed; only events from now on count
    await jetstream.publish(js, f"{stream.lower()}.seller_phone.added", b"x", msg_id="p1")
    await asyncio.wait_for(flushed.wait(), 10)
    stop.set()
    await follower


async def test_poison_opt_outs_are_terminated_and_counted_without_holding_up_the_next(
    js: JetStreamContext, clean: asyncpg.Pool, stream: str
) -> None:
    subject = f"{stream.lower()}.recipient.unsubscribed"
    unknown = outbox_events.RecipientUnsubscribed.FromString(unsubscribed(datetime.now(UTC)))
    unknown.recipient.channel = UNKNOWN_ENUM  # type: ignore[assignment]
    before = rejected("carrier")
    await publish_poison(js, subject, unknown.SerializeToString(), "poison")
    await consume(js, clean, stream, unsubscribed(datetime.now(UTC)))
    assert (await store.consent_status(clean, CLIENT)).opted_out_at is not None
    assert increase(before, rejected("carrier")) == {"undecodable": 1, "unknown_enum": 1}
    await assert_nothing_pending(js, stream, "carrier")
