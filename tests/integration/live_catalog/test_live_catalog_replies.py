"""The reply dispatcher against the real PostgreSQL and, over a real gRPC socket, a scripted
server of the outbox's EnqueueMany: a round is a few bounded calls (never one per reply),
each request keeps its row's idempotency key, the outbox's answer is read request by request
(a refused reply is recorded alone and not retried, one it could not take stays pending, the
others are marked), a call that times out leaves its rows for the next round, and two
dispatchers never send one row twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc

from infra.auth import ServiceTokenProvider
from infra.grpc_client import service_channel
from services.live_catalog.replies import GrpcReplySender, ReplyDispatcher
from tools.dev_keys import DevKeys

pytestmark = pytest.mark.usefixtures("clean_tables")
DEADLINE_S = 1.0


class Outbox(outbox_pb2_grpc.OutboxServiceServicer):
    """Answers each request by its key: `codes` scripts a refusal, the rest are stored once per
    key like the real outbox; `delay_s` holds every call (longer than the deadline: a timeout)."""

    def __init__(self) -> None:
        self.codes: dict[str, grpc.StatusCode] = {}
        self.delay_s = 0.01  # let a second dispatcher run meanwhile
        self.calls: list[list[outbox_pb2.EnqueueRequest]] = []
        self.stored: dict[str, str] = {}
        self.in_flight = self.most_in_flight = 0

    async def EnqueueMany(self, request, context):  # type: ignore[no-untyped-def]
        self.calls.append(list(request.requests))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        results = []
        for one in request.requests:
            code = self.codes.get(one.idempotency_key)
            if code is not None:
                results.append(outbox_pb2.EnqueueResult(code=code.value[0], error="scripted"))
                continue
            message_id = self.stored.setdefault(one.idempotency_key, f"m-{len(self.stored)}")
            results.append(outbox_pb2.EnqueueResult(message_id=message_id))
        return outbox_pb2.EnqueueManyResponse(results=results)

    def sent(self) -> list[str]:
        return [one.idempotency_key for call in self.calls for one in call]


@pytest.fixture
async def outbox(token_keys: DevKeys) -> AsyncIterator[tuple[Outbox, GrpcReplySender]]:
    fake, server = Outbox(), grpc.aio.server()
    outbox_pb2_grpc.add_OutboxServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = service_channel(
        f"127.0.0.1:{port}",
        token_provider=ServiceTokenProvider(token_keys.key("live_catalog"), "outbox"),
    )
    yield fake, GrpcReplySender(channel, deadline_s=DEADLINE_S)
    await channel.close()
    await server.stop(0)


async def queue(pool: asyncpg.Pool, *keys: str, content_sid: str | None = None) -> None:
    await pool.executemany(
        "INSERT INTO replies (tenant_id, idempotency_key, sender, recipient_channel,"
        " recipient_value, account_sid, body, content_sid, correlation_id)"
        " VALUES ('t', $1, 'MG1', 'whatsapp', '+33611', 'AC1', 'bonjour', $2, 'SM1')",
        [(key, content_sid) for key in keys],
    )


async def replies(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    return {row["idempotency_key"]: row for row in await pool.fetch("SELECT * FROM replies")}


async def test_each_request_is_answered_alone(pool: asyncpg.Pool, outbox) -> None:
    fake, sender = outbox
    await queue(pool, "ok", "refused", "outage")
    fake.codes = {
        "refused": grpc.StatusCode.INVALID_ARGUMENT,
        "outage": grpc.StatusCode.PERMISSION_DENIED,
    }
    assert await ReplyDispatcher(pool, sender).dispatch_once() == (2, 1)
    assert len(fake.calls) == 1  # the three in one call
    rows = await replies(pool)
    assert (rows["ok"]["outbox_message_id"], rows["ok"]["failure"]) == ("m-0", None)
    assert rows["refused"]["outbox_message_id"] is None
    assert rows["refused"]["failure"] == "outbox.EnqueueMany: INVALID_ARGUMENT: scripted"
    assert rows["refused"]["enqueued_at"] is not None
    assert rows["outage"]["enqueued_at"] is None  # still pending

    fake.codes.clear()
    assert await ReplyDispatcher(pool, sender).dispatch_once() == (1, 0)
    assert fake.sent().count("refused") == 1 and fake.sent().count("outage") == 2
    assert (await replies(pool))["outage"]["outbox_message_id"] == "m-1"


async def test_requests_carry_the_rows_keys_and_templates(pool: asyncpg.Pool, outbox) -> None:
    fake, sender = outbox
    await queue(pool, "summary-1", content_sid="HX" + "1" * 32)
    await queue(pool, "claim-1")
    assert await ReplyDispatcher(pool, sender).dispatch_once() == (2, 0)
    requests = {one.idempotency_key: one for one in fake.calls[0]}
    template = requests["summary-1"]
    assert template.WhichOneof("content") == "template"
    assert template.template.content_sid == "HX" + "1" * 32
    assert dict(template.template.variables) == {"1": "bonjour"}
    text = requests["claim-1"]
    assert (text.WhichOneof("content"), text.body) == ("body", "bonjour")
    assert text.kind == outbox_pb2.MESSAGE_KIND_CONVERSATIONAL
    assert (text.tenant_id, text.sender, text.account_sid) == ("t", "MG1", "AC1")


async def test_a_round_is_a_few_bounded_calls_at_once(pool: asyncpg.Pool, outbox) -> None:
    fake, sender = outbox
    fake.delay_s = 0.2
    await queue(pool, *(f"k{i:03}" for i in range(250)))
    dispatcher = ReplyDispatcher(pool, sender, batch_size=100, calls_in_flight=2)
    assert await dispatcher.dispatch_once() == (200, 0)
    assert [len(call) for call in fake.calls] == [100, 100]
    assert fake.most_in_flight == 2
    assert await dispatcher.dispatch_once() == (50, 0)
    assert sorted(fake.sent()) == [f"k{i:03}" for i in range(250)]


async def test_a_call_that_times_out_is_sent_again_with_the_same_keys(
    pool: asyncpg.Pool, outbox
) -> None:
    fake, sender = outbox
    await queue(pool, "a", "b")
    fake.delay_s = DEADLINE_S + 0.5
    assert await ReplyDispatcher(pool, sender).dispatch_once() == (0, 2)
    assert all(row["enqueued_at"] is None for row in (await replies(pool)).values())

    fake.delay_s = 0.01
    assert await ReplyDispatcher(pool, sender).dispatch_once() == (2, 0)
    # The outbox stored each key once (the first call's, finished after its caller gave up).
    assert sorted(fake.stored) == ["a", "b"] and fake.sent().count("a") == 2
    assert {row["outbox_message_id"] for row in (await replies(pool)).values()} == {"m-0", "m-1"}


async def test_two_dispatchers_send_each_reply_once(pool: asyncpg.Pool, outbox) -> None:
    fake, sender = outbox
    await queue(pool, *(f"k{i}" for i in range(50)))
    first, second = (
        ReplyDispatcher(pool, sender, batch_size=5, calls_in_flight=2),
        ReplyDispatcher(pool, sender, batch_size=5, calls_in_flight=2),
    )

    async def drain(dispatcher: ReplyDispatcher) -> None:
        while (await dispatcher.dispatch_once())[0]:
            pass

    await asyncio.gather(drain(first), drain(second))
    assert sorted(fake.sent()) == sorted(f"k{i}" for i in range(50))
