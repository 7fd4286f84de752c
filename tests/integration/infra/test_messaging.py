"""JetStream helpers and the event relay against a real NATS JetStream and PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import uuid
from pathlib import Path

import nats
import nats.js.errors
import pytest
from google.protobuf.wrappers_pb2 import StringValue
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from infra import jetstream
from infra.db import create_pool, migrate_service
from infra.events import EventRelay, record_event
from infra.jetstream import Ack, ConsumerSpec, Nak, StreamSpec, Term
from tests.support.jetstream import wait_settled
from tests.support.poison import assert_nothing_pending, increase, rejected
from tools.stack import reset_service_schema


@pytest.fixture
async def js(nats_url: str):
    client = await jetstream.connect(nats_url, name="test")
    yield client.jetstream()
    await client.close()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def test_ensure_stream_is_idempotent_and_applies_new_settings(js) -> None:
    name = unique("S")
    # A stream declared before the event size limit existed gets it too.
    spec = StreamSpec(
        name=name, subjects=(f"{name.lower()}.>",), duplicate_window_s=60, max_msg_size=-1
    )
    await jetstream.ensure_stream(js, spec)
    await jetstream.ensure_stream(js, spec)
    wider = StreamSpec(name=name, subjects=spec.subjects, duplicate_window_s=600)
    await jetstream.ensure_stream(js, wider)
    info = await js.stream_info(name)
    assert info.config.duplicate_window == 600
    assert info.config.max_msg_size == jetstream.MAX_EVENT_BYTES


async def test_publish_with_the_same_id_is_stored_once(js) -> None:
    name = unique("S")
    await jetstream.ensure_stream(js, StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    acks = await asyncio.gather(
        *(jetstream.publish(js, f"{name.lower()}.x", b"m", msg_id="SM1") for _ in range(3))
    )
    assert sorted(ack.duplicate or False for ack in acks) == [False, True, True]
    assert (await js.stream_info(name)).state.messages == 1


@pytest.fixture
async def publisher(nats_url: str):
    client = await jetstream.connect(nats_url, name="batch-test")
    acked = jetstream.AckedPublisher(client)
    await acked.start()
    yield client, acked
    await client.close()


@pytest.fixture
async def unreported_errors():
    """Call it to get what asyncio reported so far (e.g. a future's exception never
    retrieved, reported once the future is collected)."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: seen.append(context["message"]))

    def reported() -> list[str]:
        gc.collect()
        return seen

    yield reported
    loop.set_exception_handler(previous)


async def test_batch_publish_returns_once_every_message_is_stored(js, publisher) -> None:
    _, acked = publisher
    name = unique("S")
    await jetstream.ensure_stream(js, StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    batch = [
        jetstream.Outgoing(f"{name.lower()}.x", b"m%d" % i, msg_id=f"id{i % 40}") for i in range(50)
    ]
    batch.append(jetstream.Outgoing(f"{name.lower()}.y", b"t", msg_id="traced", headers={"a": "b"}))
    await acked.publish_batch(batch)
    # Stored before the call returned: 40 distinct ids (10 repeats are duplicates) and one more.
    assert (await js.stream_info(name)).state.messages == 41
    stored = await js.get_last_msg(name, f"{name.lower()}.y")
    assert stored.headers == {jetstream.MSG_ID: "traced", "a": "b"}


async def test_batch_publish_raises_when_a_message_has_no_stream(js, publisher) -> None:
    _, acked = publisher
    name = unique("S")
    await jetstream.ensure_stream(js, StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    batch = [
        jetstream.Outgoing(f"{name.lower()}.x", b"1", msg_id="a"),
        jetstream.Outgoing(f"{unique('nostream')}.x", b"2", msg_id="b"),
        jetstream.Outgoing(f"{name.lower()}.x", b"3", msg_id="c"),
    ]
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await acked.publish_batch(batch)
    await acked.publish_batch(batch[:1])  # the publisher still works
    assert (await js.stream_info(name)).state.messages == 2


async def test_batch_publish_times_out_when_an_ack_never_comes(
    js, publisher, unreported_errors
) -> None:
    client, acked = publisher
    name = unique("S")
    await jetstream.ensure_stream(js, StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    silent = unique("silent")
    await client.subscribe(silent)  # takes the message and never answers
    batch = [
        jetstream.Outgoing(silent, b"1", msg_id="a"),
        jetstream.Outgoing(f"{name.lower()}.x", b"2", msg_id="b"),
        jetstream.Outgoing(silent, b"3", msg_id="c"),
    ]
    async with asyncio.timeout(5):
        with pytest.raises(nats.errors.TimeoutError):
            await acked.publish_batch(batch, ack_timeout_s=0.3)
    assert (await js.stream_info(name)).state.messages == 1
    assert unreported_errors() == []


async def test_consumer_loop_carries_out_ack_nak_and_term(js) -> None:
    name = unique("S")
    subject = f"{name.lower()}.work"
    await jetstream.ensure_stream(js, StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    for body in (b"ok", b"retry", b"poison", b"boom"):
        await jetstream.publish(js, subject, body, msg_id=body.decode())
    spec = ConsumerSpec(stream=name, durable="worker", filter_subject=subject, max_deliver=3)
    seen: dict[bytes, int] = {}
    stop = asyncio.Event()
    progressed = asyncio.Event()

    async def handler(msg: Msg) -> jetstream.Decision:
        seen[msg.data] = seen.get(msg.data, 0) + 1
        progressed.set()
        if msg.data == b"retry" and seen[msg.data] == 1:
            return Nak(0.1)
        if msg.data == b"poison":
            return Term("undecodable")
        if msg.data == b"boom" and seen[msg.data] == 1:
            raise RuntimeError("peer down")
        return Ack()

    loop = asyncio.create_task(jetstream.run_pull_consumer(js, spec, handler, stop=stop))
    async with asyncio.timeout(15):
        while seen.get(b"retry", 0) < 2 or seen.get(b"boom", 0) < 2:
            progressed.clear()
            await progressed.wait()
    await asyncio.sleep(0.3)
    stop.set()
    await loop
    assert seen == {b"ok": 1, b"retry": 2, b"poison": 1, b"boom": 2}
    info = await js.consumer_info(name, "worker")
    assert info.num_pending == 0 and info.num_ack_pending == 0


@pytest.mark.parametrize(("linger_s", "bound"), [(0.0, 10), (0.5, 3)], ids=["none", "500ms"])
async def test_a_batch_consumer_lingers_after_a_short_fetch(
    js, linger_s: float, bound: int
) -> None:
    """Messages trickling in 5 ms apart: without a linger each fetch takes the one or two that
    arrived (many batches); with one, the messages of the linger make one batch."""
    name = unique("S")
    subject = f"{name.lower()}.work"
    await jetstream.ensure_stream(js, StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    spec = ConsumerSpec(stream=name, durable="batches", filter_subject=subject)
    batches: list[int] = []
    stop = asyncio.Event()

    async def handler(msgs: list[Msg]) -> list[jetstream.Decision]:
        batches.append(len(msgs))
        return [Ack() for _ in msgs]

    loop = asyncio.create_task(
        jetstream.run_batch_consumer(
            js, spec, handler, stop=stop, batch_size=100, linger_s=linger_s
        )
    )
    await jetstream.ensure_consumer(js, spec)
    for n in range(40):
        await jetstream.publish(js, subject, b"m", msg_id=f"{name}-{n}")
        await asyncio.sleep(0.005)
    async with asyncio.timeout(15):
        while sum(batches) < 40:
            await asyncio.sleep(0.05)
    stop.set()
    await loop
    assert sum(batches) == 40
    if linger_s:
        assert len(batches) <= bound, batches
    else:
        assert len(batches) > bound, batches


async def test_an_event_over_the_size_limit_is_refused_or_terminated_unread(js) -> None:
    """Every stream refuses an event over MAX_EVENT_BYTES; one a stream took before it had the
    limit is terminated and counted by the loop without reaching the handler, and the event
    behind it is handled."""
    limited, unlimited = unique("L"), unique("U")
    huge = b"x" * (jetstream.MAX_EVENT_BYTES + 1)
    await jetstream.ensure_stream(js, StreamSpec(name=limited, subjects=(f"{limited.lower()}.>",)))
    with pytest.raises(nats.js.errors.APIError, match="maximum"):
        await jetstream.publish(js, f"{limited.lower()}.work", huge, msg_id="huge")
    await js.delete_stream(limited)
    subject = f"{unlimited.lower()}.work"
    spec = StreamSpec(name=unlimited, subjects=(f"{unlimited.lower()}.>",), max_msg_size=-1)
    await jetstream.ensure_stream(js, spec)
    await jetstream.publish(js, subject, huge, msg_id="huge")
    await jetstream.publish(js, subject, b"ok", msg_id="ok")
    consumer = ConsumerSpec(stream=unlimited, durable="sized", filter_subject=subject)
    before = rejected("sized")
    seen: list[bytes] = []
    stop = asyncio.Event()

    async def handler(msg: Msg) -> jetstream.Decision:
        seen.append(msg.data)
        return Ack()

    loop = asyncio.create_task(jetstream.run_pull_consumer(js, consumer, handler, stop=stop))
    await wait_settled(js, unlimited, "sized", subject, timeout_s=15)
    stop.set()
    await loop
    assert seen == [b"ok"]
    assert increase(before, rejected("sized")) == {"too_large": 1}
    await assert_nothing_pending(js, unlimited, "sized")
    await js.delete_stream(unlimited)


async def test_consumer_loop_exports_its_backlog_and_the_age_of_the_oldest_held(js) -> None:
    name = unique("S")
    subject = f"{name.lower()}.work"
    await jetstream.ensure_stream(js, StreamSpec(name=name, subjects=(f"{name.lower()}.>",)))
    for body in (b"first", b"second", b"third"):
        await jetstream.publish(js, subject, body, msg_id=body.decode())
    await asyncio.sleep(1.0)  # the messages are now a second old
    spec = ConsumerSpec(stream=name, durable="worker", filter_subject=subject)
    queue = {"queue": f"{name}/worker"}
    held, release, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(msg: Msg) -> jetstream.Decision:
        held.set()
        await release.wait()
        return Ack()

    loop = asyncio.create_task(jetstream.run_pull_consumer(js, spec, handler, stop=stop))
    async with asyncio.timeout(10):
        await held.wait()
        while REGISTRY.get_sample_value("snapsell_queue_depth", queue) is None:
            await asyncio.sleep(0.05)
    # Delivered and unacknowledged count as waiting, as in KEDA's lag.
    assert REGISTRY.get_sample_value("snapsell_queue_depth", queue) == 3
    age = REGISTRY.get_sample_value("snapsell_queue_oldest_age_seconds", queue)
    assert age is not None and 1.0 <= age < 10.0
    release.set()
    stop.set()
    await loop
    assert REGISTRY.get_sample_value("snapsell_queue_oldest_age_seconds", queue) == 0.0


async def test_recorded_events_are_relayed_once_with_their_id(
    js, nats_url: str, admin_dsn: str
) -> None:
    service = "eventtest"
    await reset_service_schema(admin_dsn, service)
    migrations = Path(__file__).parent / "no_migrations"
    migrations.mkdir(exist_ok=True)
    pool = await create_pool(await migrate_service(service, migrations), service)
    stream = StreamSpec(name="EVENTTEST_EVENTS", subjects=("eventtest.v1.>",))
    await jetstream.ensure_stream(js, stream)
    await js.purge_stream(stream.name)
    try:
        async with pool.acquire() as conn:
            async with conn.transaction():
                ids = [
                    await record_event(
                        conn,
                        subject="eventtest.v1.thing.happened",
                        message=StringValue(value=f"v{i}"),
                        aggregate_id=f"a{i}",
                    )
                    for i in range(5)
                ]
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await record_event(
                        conn,
                        subject="eventtest.v1.thing.happened",
                        message=StringValue(value="rolled back"),
                        aggregate_id="x",
                    )
                    raise RuntimeError("abort")

        received: list[tuple[str, str]] = []
        sub = await js.subscribe("eventtest.v1.>", ordered_consumer=True)
        stop = asyncio.Event()
        relay_client = await jetstream.connect(nats_url, name="relay-test")
        relays = [EventRelay(pool, relay_client, service, poll_interval_s=0.2) for _ in range(2)]
        tasks = [asyncio.create_task(relay.run(stop)) for relay in relays]
        async with asyncio.timeout(10):
            while len(received) < 5:
                msg = await sub.next_msg(timeout=5)
                received.append(
                    (msg.headers[jetstream.MSG_ID], StringValue.FromString(msg.data).value)
                )
        stop.set()
        await asyncio.gather(*tasks)
        await relay_client.close()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.5)
        assert received == [(str(i), f"v{n}") for n, i in enumerate(ids)]
        async with pool.acquire() as conn:
            assert (
                await conn.fetchval("SELECT count(*) FROM events WHERE published_at IS NULL") == 0
            )
    finally:
        await pool.close()
