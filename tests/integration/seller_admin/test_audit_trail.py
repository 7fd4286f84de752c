"""The audit trail that lasts: changes are audit-class events, kept past the delivery events'
retention in the database and copied to the long-lived AUDIT stream, from which
`ListAuditRecords` answers who changed what for one tenant between two instants."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra import jetstream
from infra.retention import RetentionSettings, RetentionTask
from infra.streams import AUDIT_STREAM, audit_stream
from services.seller_admin import audit
from tests.integration.seller_admin.conftest import (
    Metadata,
    add_channel,
    create_tenant,
    new_business_number,
    new_mobile,
)
from tests.support.polling import eventually

Stub = seller_admin_pb2_grpc.SellerAdminServiceStub
TENANT, NEIGHBOUR = "trail-shop", "trail-neighbour"


def at(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def instant() -> datetime:
    """A moment strictly between the changes made before and after it."""
    await asyncio.sleep(0.05)
    moment = datetime.now(UTC)
    await asyncio.sleep(0.05)
    return moment


async def add_seller(stub: Stub, who: Metadata, tenant_id: str) -> pb.SellerPhone:
    reply = await stub.AddSellerPhone(
        pb.AddSellerPhoneRequest(tenant_id=tenant_id, phone_number=new_mobile()), metadata=who
    )
    return reply.seller_phone


async def test_the_trail_answers_who_changed_what_between_two_instants(
    stub: Stub, relay: None, admin: Metadata, bearer: Callable[..., Metadata]
) -> None:
    owner = bearer("owner", TENANT, sub="marie")
    neighbour_owner = bearer("owner", NEIGHBOUR, sub="paul")
    await create_tenant(stub, admin, TENANT)
    await create_tenant(stub, admin, NEIGHBOUR)
    early = await add_seller(stub, owner, TENANT)  # before the range
    since = await instant()
    channel = await add_channel(stub, admin, TENANT, f"whatsapp:{new_business_number()}")
    await add_seller(stub, neighbour_owner, NEIGHBOUR)  # another tenant's change
    phone = await add_seller(stub, owner, TENANT)
    await stub.RemoveSellerPhone(
        pb.RemoveSellerPhoneRequest(phone_number=early.address), metadata=owner
    )
    until = await instant()
    await add_seller(stub, owner, TENANT)  # after the range
    request = pb.ListAuditRecordsRequest(tenant_id=TENANT, since=at(since), until=at(until))

    async def records() -> list[pb.AuditRecord]:
        reply = await stub.ListAuditRecords(request, metadata=admin)
        return list(reply.records) if len(reply.records) == 3 else []

    trail = await eventually(records, "three changes of the tenant in the range")

    assert [(r.actor, r.action, r.target) for r in trail] == [
        ("ops-admin", audit.CHANNEL_ADDED, str(channel.channel_id)),
        ("marie", audit.SELLER_PHONE_ADDED, str(phone.seller_phone_id)),
        ("marie", audit.SELLER_PHONE_REMOVED, str(early.seller_phone_id)),
    ]
    assert {r.tenant_id for r in trail} == {TENANT}
    moments = [r.occurred_at.ToDatetime(tzinfo=UTC) for r in trail]
    assert since < moments[0] < moments[1] < moments[2] < until
    # What changed, from the event itself (the phone masked, as in every event).
    assert trail[2].details["maskedAddress"] == early.address[:3] + "******" + early.address[-2:]
    assert trail[0].details["channel"]["address"] == channel.address
    # The tenant's owner reads the same trail of its own tenant.
    mine = await stub.ListAuditRecords(
        pb.ListAuditRecordsRequest(since=at(since), until=at(until)), metadata=owner
    )
    assert list(mine.records) == trail


@pytest.mark.parametrize("role", ["owner", "manager", "staff"])
async def test_another_tenants_token_cannot_read_the_trail(
    stub: Stub, admin: Metadata, bearer: Callable[..., Metadata], role: str
) -> None:
    await create_tenant(stub, admin, NEIGHBOUR)
    request = pb.ListAuditRecordsRequest(tenant_id=TENANT, since=at(datetime(2020, 1, 1)))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListAuditRecords(request, metadata=bearer(role, NEIGHBOUR))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_audit_events_outlive_the_delivery_events_retention(
    stub: Stub, pool: asyncpg.Pool, relay: None, admin: Metadata
) -> None:
    tenant_id = "trail-retention"
    await create_tenant(stub, admin, tenant_id)
    await pool.execute(
        "INSERT INTO events (subject, aggregate_id, tenant_id, payload, published_at)"
        " VALUES ($1, 'delivery', $2, '', now())",
        audit.TENANT_CREATED,
        tenant_id,
    )

    async def all_published() -> bool:
        pending = await pool.fetchval(
            "SELECT count(*) FROM events WHERE tenant_id = $1 AND published_at IS NULL", tenant_id
        )
        return pending == 0

    await eventually(all_published, "the tenant's events published")
    # Both ten days old: past a week's delivery retention, well within a year's audit retention.
    await pool.execute(
        "UPDATE events SET published_at = now() - interval '10 days' WHERE tenant_id = $1",
        tenant_id,
    )
    settings = RetentionSettings(
        interval_s=3600,
        batch_size=100,
        events_max_age=timedelta(days=7),
        audit_max_age=timedelta(days=400),
    )

    await RetentionTask.from_settings(pool, settings).run_once()

    kept = await pool.fetch(
        "SELECT aggregate_id, actor FROM events WHERE tenant_id = $1", tenant_id
    )
    assert [(row["aggregate_id"], row["actor"]) for row in kept] == [(tenant_id, "ops-admin")]

    # Past the audit retention too, it goes.
    short_audit = RetentionSettings(
        interval_s=3600, batch_size=100, events_max_age=None, audit_max_age=timedelta(days=9)
    )
    assert await RetentionTask.from_settings(pool, short_audit).run_once() == {"audit events": 1}


async def test_the_audit_stream_keeps_its_configured_max_age(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDIT_STREAM_MAX_AGE_DAYS", "30")
    try:
        await jetstream.ensure_stream(js, audit_stream())
        info = await js.stream_info(AUDIT_STREAM)
        assert info.config.max_age == 30 * 86400
        assert info.config.subjects == ["audit.>"]
    finally:
        monkeypatch.delenv("AUDIT_STREAM_MAX_AGE_DAYS")
        await jetstream.ensure_stream(js, audit_stream())
    info = await js.stream_info(AUDIT_STREAM)
    assert info.config.max_age == 400 * 86400
