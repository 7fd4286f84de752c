"""Audit events of seller_admin: built from the change and the caller, recorded in the caller's
transaction (so an event exists exactly when its change committed) as audit-class events (with
the caller's token subject as actor: kept long and copied to the AUDIT stream), relayed by
infra."""

from __future__ import annotations

from snapsell.seller_admin.v1 import events_pb2

from infra.auth import Principal
from infra.db import Connection
from infra.events import record_event
from services.seller_admin import convert
from services.seller_admin.domain import Channel, SellerPhone, Tenant, mask_address

CONTEXT = "seller_admin"
TENANT_CREATED = "seller_admin.v1.tenant.created"
CHANNEL_ADDED = "seller_admin.v1.channel.added"
CHANNEL_REMOVED = "seller_admin.v1.channel.removed"
SELLER_PHONE_ADDED = "seller_admin.v1.seller_phone.added"
SELLER_PHONE_REMOVED = "seller_admin.v1.seller_phone.removed"


def _actor(principal: Principal) -> events_pb2.Actor:
    return events_pb2.Actor(sub=principal.sub, role=principal.role)


async def tenant_created(conn: Connection, actor: Principal, tenant: Tenant) -> None:
    event = events_pb2.TenantCreated(actor=_actor(actor), tenant=convert.tenant(tenant))
    await record_event(
        conn,
        subject=TENANT_CREATED,
        message=event,
        aggregate_id=tenant.tenant_id,
        tenant_id=tenant.tenant_id,
        actor=actor.sub,
    )


async def channel_changed(
    conn: Connection, actor: Principal, channel: Channel, *, added: bool
) -> None:
    event_type = events_pb2.ChannelAdded if added else events_pb2.ChannelRemoved
    event = event_type(actor=_actor(actor), channel=convert.channel(channel))
    await record_event(
        conn,
        subject=CHANNEL_ADDED if added else CHANNEL_REMOVED,
        message=event,
        aggregate_id=str(channel.channel_id),
        tenant_id=channel.tenant_id,
        actor=actor.sub,
    )


async def seller_phone_changed(
    conn: Connection, actor: Principal, phone: SellerPhone, *, added: bool
) -> None:
    event_type = events_pb2.SellerPhoneAdded if added else events_pb2.SellerPhoneRemoved
    event = event_type(
        actor=_actor(actor),
        tenant_id=phone.tenant_id,
        seller_phone_id=str(phone.seller_phone_id),
        kind=convert.SELLER_PHONE_KINDS[phone.address.kind],
        masked_address=mask_address(phone.address.value),
    )
    await record_event(
        conn,
        subject=SELLER_PHONE_ADDED if added else SELLER_PHONE_REMOVED,
        message=event,
        aggregate_id=str(phone.seller_phone_id),
        tenant_id=phone.tenant_id,
        actor=actor.sub,
    )
