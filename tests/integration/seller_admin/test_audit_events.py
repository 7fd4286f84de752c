"""Each change writes one audit row in its own transaction (none for no-ops and refusals), and
the relay publishes it to JetStream as the protobuf event with `Nats-Msg-Id` = the event id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from nats.js import JetStreamContext
from snapsell.seller_admin.v1 import events_pb2, seller_admin_pb2_grpc
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb

from infra.jetstream import MSG_ID
from tests.integration.seller_admin.conftest import (
    ACCOUNT_SID,
    Metadata,
    new_business_number,
)

Stub = seller_admin_pb2_grpc.SellerAdminServiceStub
TENANT = "audit-shop"
SELLER_NUMBER = "+33644556677"
EVENT_TYPES: dict[str, type[Message]] = {
    "seller_admin.v1.tenant.created": events_pb2.TenantCreated,
    "seller_admin.v1.channel.added": events_pb2.ChannelAdded,
    "seller_admin.v1.channel.removed": events_pb2.ChannelRemoved,
    "seller_admin.v1.seller_phone.added": events_pb2.SellerPhoneAdded,
    "seller_admin.v1.seller_phone.removed": events_pb2.SellerPhoneRemoved,
}


async def make_changes(stub: Stub, admin: Metadata, owner: Metadata) -> None:
    """Five changes, interleaved with no-ops and refused calls that must record nothing."""
    await stub.CreateTenant(
        pb.CreateTenantRequest(tenant_id=TENANT, display_name="Audit"), metadata=admin
    )
    await stub.CreateTenant(
        pb.CreateTenantRequest(tenant_id=TENANT, display_name="Audit"), metadata=admin
    )
    channel = pb.AddChannelRequest(
        tenant_id=TENANT, address=f"whatsapp:{new_business_number()}", account_sid=ACCOUNT_SID
    )
    await stub.AddChannel(channel, metadata=admin)
    await stub.AddChannel(channel, metadata=admin)
    add = pb.AddSellerPhoneRequest(phone_number=SELLER_NUMBER)
    await stub.AddSellerPhone(add, metadata=owner)
    await stub.AddSellerPhone(add, metadata=owner)
    remove = pb.RemoveSellerPhoneRequest(phone_number=SELLER_NUMBER)
    await stub.RemoveSellerPhone(remove, metadata=owner)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.RemoveSellerPhone(remove, metadata=owner)
    await stub.RemoveChannel(
        pb.RemoveChannelRequest(tenant_id=TENANT, address=channel.address), metadata=admin
    )


async def wait_published(pool: asyncpg.Pool, timeout_s: float = 10.0) -> list[asyncpg.Record]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await pool.fetch(
            "SELECT id, subject, aggregate_id, tenant_id, payload, published_at FROM events"
            " WHERE tenant_id = $1 ORDER BY id",
            TENANT,
        )
        if all(row["published_at"] is not None for row in rows) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def stream_messages(js: JetStreamContext, wanted: set[str]) -> dict[str, tuple[str, bytes]]:
    """Nats-Msg-Id -> (subject, data) for the wanted ids, read from the events stream."""
    found: dict[str, tuple[str, bytes]] = {}
    subscription = await js.subscribe(
        "seller_admin.v1.>", stream="SELLER_ADMIN_EVENTS", ordered_consumer=True
    )
    try:
        deadline = time.monotonic() + 10.0
        while wanted - found.keys() and time.monotonic() < deadline:
            try:
                msg = await subscription.next_msg(timeout=1.0)
            except TimeoutError:
                continue
            msg_id = (msg.headers or {}).get(MSG_ID, "")
            if msg_id in wanted:
                found[msg_id] = (msg.subject, msg.data)
    finally:
        await subscription.unsubscribe()
    return found


async def test_changes_are_audited_and_relayed_to_jetstream(
    stub: Stub,
    pool: asyncpg.Pool,
    js: JetStreamContext,
    relay: None,
    admin: Metadata,
    bearer: Callable[..., Metadata],
) -> None:
    await make_changes(stub, admin, bearer("owner", TENANT, sub="marie"))

    rows = await wait_published(pool)
    assert [row["subject"] for row in rows] == [
        "seller_admin.v1.tenant.created",
        "seller_admin.v1.channel.added",
        "seller_admin.v1.seller_phone.added",
        "seller_admin.v1.seller_phone.removed",
        "seller_admin.v1.channel.removed",
    ]
    assert all(row["published_at"] is not None for row in rows), "relay did not publish"
    events = [EVENT_TYPES[row["subject"]].FromString(row["payload"]) for row in rows]
    created, channel_added, phone_added, phone_removed, channel_removed = events
    assert isinstance(created, events_pb2.TenantCreated)
    assert (created.actor.sub, created.actor.role) == ("ops-admin", "admin")
    assert created.tenant.tenant_id == TENANT
    assert isinstance(channel_added, events_pb2.ChannelAdded)
    assert isinstance(channel_removed, events_pb2.ChannelRemoved)
    assert channel_added.channel == channel_removed.channel
    assert channel_added.channel.account_sid == ACCOUNT_SID
    for event in (phone_added, phone_removed):
        assert isinstance(event, events_pb2.SellerPhoneAdded | events_pb2.SellerPhoneRemoved)
        assert (event.actor.sub, event.actor.role) == ("marie", "owner")
        assert event.tenant_id == TENANT
        assert event.masked_address == "+33******77"
        assert event.kind == pb.SELLER_PHONE_KIND_PHONE_NUMBER
    assert phone_added.seller_phone_id == phone_removed.seller_phone_id
    assert all(SELLER_NUMBER[1:].encode() not in row["payload"] for row in rows)

    published = await stream_messages(js, {str(row["id"]) for row in rows})
    for row in rows:
        assert published[str(row["id"])] == (row["subject"], row["payload"])
