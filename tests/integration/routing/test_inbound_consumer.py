"""The inbound consumer on a real NATS JetStream and PostgreSQL (peers faked): ack after commit,
retry on peer failure, undecodable and exhausted messages recorded and terminated."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from nats.js import JetStreamContext

from infra import jetstream
from infra.jetstream import ConsumerSpec, StreamSpec
from services.routing.consumer import InboundConsumer
from services.routing.domain import RulesBook
from services.routing.inbound import InboundRouter
from tests.integration.routing.fakes import FakeReplies, FakeSenders, FakeSessions, inbound
from tests.support.jetstream import wait_settled
from tests.support.poison import (
    UNKNOWN_ENUM,
    assert_nothing_pending,
    increase,
    publish_poison,
    rejected,
)
from tests.support.polling import eventually


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    client = await jetstream.connect(nats_url, name="routing-test")
    yield client.jetstream()
    await client.close()


@pytest.fixture
async def stream(js: JetStreamContext) -> AsyncIterator[str]:
    name = f"RT{uuid.uuid4().hex[:8].upper()}"
    await jetstream.ensure_stream(js, StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    yield name
    await js.delete_stream(name)


class Running:
    """The consumer loop over `stream`, with the fakes behind the router."""

    def __init__(self, js: JetStreamContext, pool: asyncpg.Pool, stream: str) -> None:
        self.js = js
        self.subject = f"{stream.lower()}.message.received"
        self.spec = ConsumerSpec(
            stream=stream,
            durable="routing",
            filter_subject=self.subject,
            ack_wait_s=5,
            max_deliver=4,
        )
        self.senders, self.sessions, self.replies = FakeSenders(), FakeSessions(), FakeReplies()
        router = InboundRouter(
            pool,
            senders=self.senders,
            sessions=self.sessions,
            replies=self.replies,
            rules=RulesBook(),
        )
        self.consumer = InboundConsumer(router, pool, self.spec, retry_delay_cap_s=0.2)
        self.stop = asyncio.Event()
        self.batch_size = 16

    async def start(self) -> None:
        await jetstream.ensure_consumer(self.js, self.spec)
        self.task = asyncio.create_task(
            jetstream.run_batch_consumer(
                self.js,
                self.spec,
                self.consumer.handle_batch,
                stop=self.stop,
                batch_size=self.batch_size,
                batches_in_flight=2,
            )
        )

    async def publish(self, data: bytes, msg_id: str) -> None:
        await jetstream.publish(self.js, self.subject, data, msg_id=msg_id)

    async def drained(self) -> None:
        """Until every stream message was acked or terminated."""
        await wait_settled(self.js, self.spec.stream, self.spec.durable, self.subject)

    async def close(self) -> None:
        self.stop.set()
        await self.task


@pytest.fixture
async def running(js: JetStreamContext, clean: asyncpg.Pool, stream: str) -> AsyncIterator[Running]:
    running = Running(js, clean, stream)
    await running.start()
    yield running
    await running.close()


async def test_messages_are_routed_and_acked(running: Running, clean: asyncpg.Pool) -> None:
    for body in ("STOP", "A12", "salut"):
        message = inbound(body)
        await running.publish(message.SerializeToString(), message.message_sid)
    await running.drained()
    assert await clean.fetchval("SELECT count(*) FROM processed_inbound") == 3
    assert len(running.replies.messages) == 1
    assert len(running.sessions.touches) == 1


async def test_the_same_webhook_republished_after_the_dedupe_window_has_one_effect(
    running: Running, clean: asyncpg.Pool
) -> None:
    message = inbound("STOP")
    # A different Nats-Msg-Id is what a publish after the duplicate window looks like.
    for copy in range(5):
        await running.publish(message.SerializeToString(), f"{message.message_sid}-{copy}")
    await running.drained()
    assert await clean.fetchval("SELECT count(*) FROM processed_inbound") == 1
    assert await clean.fetchval("SELECT count(*) FROM opt_outs") == 1
    assert len(running.replies.messages) == 1


async def test_a_peer_outage_delays_messages_until_it_is_back(
    running: Running, clean: asyncpg.Pool
) -> None:
    running.senders.down = True
    message = inbound("A12")
    await running.publish(message.SerializeToString(), message.message_sid)
    await eventually(lambda: running.senders.calls >= 2)
    assert await clean.fetchval("SELECT count(*) FROM processed_inbound") == 0
    running.senders.down = False
    await running.drained()
    assert await clean.fetchval("SELECT count(*) FROM processed_inbound") == 1
    assert await clean.fetchval("SELECT count(*) FROM failed_inbound") == 0


async def test_an_undecodable_message_is_recorded_and_terminated(
    running: Running, clean: asyncpg.Pool
) -> None:
    await running.publish(b"\xff\xff not a protobuf", "garbage-1")
    await running.drained()
    row = await clean.fetchrow("SELECT reason, deliveries, payload FROM failed_inbound")
    assert row["reason"] == "undecodable" and row["deliveries"] == 1
    assert row["payload"] == b"\xff\xff not a protobuf"
    assert await clean.fetchval(
        "SELECT count(*) FROM events WHERE subject = 'routing.v1.message.unroutable'"
    )


async def test_a_message_failing_on_every_delivery_is_recorded_as_dead(
    running: Running, clean: asyncpg.Pool
) -> None:
    running.sessions.down = True
    message = inbound("A12")
    await running.publish(message.SerializeToString(), message.message_sid)
    await running.drained()
    row = await clean.fetchrow("SELECT reason, deliveries, message_sid FROM failed_inbound")
    assert row["reason"] == "deliveries_exhausted"
    assert row["deliveries"] == running.spec.max_deliver
    assert row["message_sid"] == message.message_sid
    assert await clean.fetchval("SELECT count(*) FROM processed_inbound") == 0


async def test_poison_messages_are_terminated_and_counted_without_holding_up_the_next(
    running: Running, clean: asyncpg.Pool
) -> None:
    unknown = inbound("salut")
    unknown.sender.channel = UNKNOWN_ENUM  # type: ignore[assignment]
    before = rejected(running.spec.durable)
    await publish_poison(running.js, running.subject, unknown.SerializeToString(), "poison")
    good = inbound("STOP")
    await running.publish(good.SerializeToString(), good.message_sid)
    await running.drained()
    assert await clean.fetchval("SELECT message_sid FROM processed_inbound") == good.message_sid
    assert increase(before, rejected(running.spec.durable)) == {"undecodable": 1, "unknown_enum": 1}
    await assert_nothing_pending(running.js, running.spec.stream, running.spec.durable)
