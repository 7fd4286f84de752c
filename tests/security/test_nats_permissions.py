"""NATS is locked down: every service connects as its own user and may publish only its own
subjects (and the JetStream requests of its streams and consumers); a connection without
credentials is refused. Against the session's embedded server, configured from
infra/nats_users.py as `make run` and the deployment are."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from infra import jetstream
from infra.jetstream import ConsumerSpec, NatsCredentials
from infra.streams import INBOUND_MESSAGE_SUBJECT, INBOUND_STATUS_SUBJECT, inbound_stream
from tools.devstack import nats_service_env


@contextlib.asynccontextmanager
async def connected_as(nats_url: str, service: str) -> AsyncIterator[tuple[NatsClient, list]]:
    """A client with `service`'s credentials; the permission errors the server reported."""
    env = nats_service_env(nats_url, service)
    assert env, "the test server must run with authentication on (an admin URL)"
    errors: list[Exception] = []

    async def on_error(error: Exception) -> None:
        errors.append(error)

    client = await nats.connect(
        env["NATS_URL"],
        error_cb=on_error,
        allow_reconnect=False,
        **NatsCredentials(env["NATS_USER"], env["NATS_PASSWORD"]).options(),
    )
    try:
        yield client, errors
    finally:
        await client.close()


async def stored_count(admin: NatsClient, stream: str, subject: str) -> int:
    info = await admin.jetstream().stream_info(stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


@pytest.fixture
async def admin(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await jetstream.connect(nats_url, name="permissions-test")
    await jetstream.ensure_stream(client.jetstream(), inbound_stream())
    try:
        yield client
    finally:
        await client.close()


async def refusal(nats_url: str, **credentials: str) -> str:
    """What the server answers a connection to it with these credentials."""
    client = NatsClient()
    address = nats_service_env(nats_url, "gateway")["NATS_URL"]
    try:
        await client.connect(address, allow_reconnect=False, **credentials)
    except nats.errors.Error as error:
        return str(error).lower()
    finally:
        await client.close()
    return "connected"


async def test_a_connection_without_credentials_is_refused(nats_url: str) -> None:
    assert "authorization violation" in await refusal(nats_url)


async def test_a_wrong_password_is_refused(nats_url: str) -> None:
    assert "authorization violation" in await refusal(nats_url, user="gateway", password="x")


@pytest.mark.parametrize(
    ("service", "stream", "subject"),
    [
        ("gateway", "OUTBOX_EVENTS", "outbox.v1.message.sent"),
        ("routing", "INBOUND", INBOUND_MESSAGE_SUBJECT),
        ("outbox", "INBOUND", INBOUND_STATUS_SUBJECT),
        ("live_session", "ROUTING_EVENTS", "routing.v1.message.routed"),
        ("seller_admin", "LIVE_SESSION_EVENTS", "live_session.v1.session.closed"),
    ],
)
async def test_a_service_publishing_outside_its_subjects_is_refused(
    admin: NatsClient, nats_url: str, service: str, stream: str, subject: str
) -> None:
    js = admin.jetstream()
    owner = stream.removesuffix("_EVENTS").lower()
    if stream != "INBOUND":
        await jetstream.ensure_stream(js, jetstream.StreamSpec(stream, (f"{owner}.v1.>",)))
    before = await stored_count(admin, stream, subject)
    async with connected_as(nats_url, service) as (client, errors):
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await client.jetstream().publish(subject, b"forged", timeout=0.5)
        await client.flush()
    assert any("permissions violation for publish" in str(e).lower() for e in errors), errors
    assert await stored_count(admin, stream, subject) == before


async def test_a_service_cannot_read_another_services_consumer(
    admin: NatsClient, nats_url: str
) -> None:
    """The gateway may not pull routing's inbound messages (nor subscribe to the stream's
    subjects or to another user's inbox)."""
    async with connected_as(nats_url, "gateway") as (client, errors):
        with pytest.raises(nats.errors.TimeoutError):
            await client.request("$JS.API.CONSUMER.MSG.NEXT.INBOUND.routing", b"1", timeout=0.5)
        await client.subscribe("gateway.v1.>")
        await client.subscribe("_INBOX.routing.>")
        await client.flush()
        await asyncio.sleep(0.1)
    text = " ".join(str(e).lower() for e in errors)
    assert "permissions violation for publish" in text
    assert 'subscription to "gateway.v1.>"' in text
    assert 'subscription to "_inbox.routing.>"' in text


async def test_the_gateway_publishes_inbound_messages(admin: NatsClient, nats_url: str) -> None:
    before = await stored_count(admin, "INBOUND", INBOUND_MESSAGE_SUBJECT)
    async with connected_as(nats_url, "gateway") as (client, errors):
        js = client.jetstream()
        await jetstream.ensure_stream(js, inbound_stream())
        ack = await jetstream.publish(
            js, INBOUND_MESSAGE_SUBJECT, b"hello", msg_id=f"SM{uuid.uuid4().hex}"
        )
    assert ack.stream == "INBOUND" and not errors
    assert await stored_count(admin, "INBOUND", INBOUND_MESSAGE_SUBJECT) == before + 1


async def test_outbox_consumes_and_acks_status_callbacks(admin: NatsClient, nats_url: str) -> None:
    # The outbox's own durable, as services/outbox/consumer.py declares it.
    spec = ConsumerSpec("INBOUND", "outbox-status-callbacks", INBOUND_STATUS_SUBJECT)
    await jetstream.publish(
        admin.jetstream(), INBOUND_STATUS_SUBJECT, b"status", msg_id=uuid.uuid4().hex
    )
    async with connected_as(nats_url, "outbox") as (client, errors):
        js = client.jetstream()
        await jetstream.ensure_consumer(js, spec)
        subscription = await js.pull_subscribe_bind(spec.durable, stream=spec.stream)
        while messages := await subscription.fetch(100, timeout=2.0):
            for message in messages:
                await message.ack_sync()
            if len(messages) < 100:
                break
        await client.flush()
    assert not errors
    info = await admin.jetstream().consumer_info(spec.stream, spec.durable)
    assert info.num_ack_pending == 0 and info.num_pending == 0
