"""A SIGKILL of the catalog after the outbox accepted a reply and before the catalog recorded
that: the restarted process sends it again with the same idempotency key, so the client gets
one reply; the claim itself stays one reservation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from nats.js import JetStreamContext
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc

from infra import jetstream
from tests.integration.live_catalog.test_live_catalog_process import (
    SELLER,
    eventually,
    publish,
    routed,
)
from tests.support.processes import restart, start_service
from tools.dev_keys import DevKeys
from tools.stack import reset_service_schema

SERVICE = "live_catalog"
CLIENT = "+33633000001"


class StallingOutbox(outbox_pb2_grpc.OutboxServiceServicer):
    """Stores every request of an EnqueueMany (idempotent on the key, like the real outbox);
    the answer to the first call with a request for CLIENT never comes, as if the caller died
    before reading it."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, str], outbox_pb2.EnqueueRequest] = {}
        self.calls: list[str] = []
        self.stalled = asyncio.Event()

    async def EnqueueMany(self, request, context):  # type: ignore[no-untyped-def]
        results = []
        for one in request.requests:
            key = (one.tenant_id, one.idempotency_key)
            created = key not in self.stored
            self.stored.setdefault(key, one)
            self.calls.append(one.idempotency_key)
            results.append(outbox_pb2.EnqueueResult(message_id=str(hash(key)), created=created))
        to_client = any(one.recipient.value == CLIENT for one in request.requests)
        if to_client and not self.stalled.is_set():
            self.stalled.set()
            await asyncio.sleep(3600)
        return outbox_pb2.EnqueueManyResponse(results=results)


@pytest.fixture
async def outbox() -> AsyncIterator[tuple[StallingOutbox, int]]:
    server = grpc.aio.server()
    stalling = StallingOutbox()
    outbox_pb2_grpc.add_OutboxServiceServicer_to_server(stalling, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield stalling, port
    await server.stop(0)


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    client = await jetstream.connect(nats_url, name="live-catalog-crash-test")
    yield client.jetstream()
    await client.close()


async def test_sigkill_after_the_outbox_accepted_a_reply_sends_it_once(
    admin_dsn: str, nats_url: str, token_keys: DevKeys, outbox, js
) -> None:
    stalling, port = outbox
    await reset_service_schema(admin_dsn, SERVICE)
    env = {
        "DATABASE_URL": admin_dsn,
        "NATS_URL": nats_url,
        "OUTBOX_ADDR": f"127.0.0.1:{port}",
        **token_keys.env(SERVICE),  # its own signing key, to call the outbox as live_catalog
    }
    running = await start_service(SERVICE, env)
    tenant, session = f"crash-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    try:
        await publish(
            js,
            routed("A12 Robe 25€ x1", tenant=tenant, session=session, sender=SELLER, seller=True),
        )
        await eventually(lambda: any(t == tenant for t, _ in stalling.stored))
        await publish(
            js, routed("A12", tenant=tenant, session=session, sender=CLIENT, sid="SMcrash")
        )
        async with asyncio.timeout(15):
            await stalling.stalled.wait()
        running.kill()
        running = await restart(running)
        await eventually(lambda: stalling.calls.count("live_catalog:reply:SMcrash") == 2)
    finally:
        assert running.stop() == 0, running.logs()

    to_client = [r for (t, key), r in stalling.stored.items() if t == tenant and "SMcrash" in key]
    assert [r.body for r in to_client] == [  # one message for the outbox to send
        "A12 est réservé pour vous (1 x Robe) pendant 30 min."
    ]
    conn = await asyncpg.connect(admin_dsn, server_settings={"search_path": SERVICE})
    try:
        assert await conn.fetchval("SELECT count(*) FROM reservations") == 1
        assert await conn.fetchval("SELECT count(*) FROM replies WHERE enqueued_at IS NULL") == 0
    finally:
        await conn.close()
