"""Domain objects to their protobuf messages (the v1 contract) and back for enums."""

from __future__ import annotations

from snapsell.common.v1 import address_pb2
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb

from infra.convert import timestamp
from services.seller_admin.audit_trail import AuditRecord
from services.seller_admin.domain import (
    Channel,
    ChannelKind,
    SellerPhone,
    SellerPhoneKind,
    SenderRole,
    Tenant,
)

CHANNEL_KINDS = {
    ChannelKind.WHATSAPP: pb.CHANNEL_KIND_WHATSAPP,
    ChannelKind.SMS: pb.CHANNEL_KIND_SMS,
    ChannelKind.MESSAGING_SERVICE: pb.CHANNEL_KIND_MESSAGING_SERVICE,
}
SELLER_PHONE_KINDS = {
    SellerPhoneKind.PHONE_NUMBER: pb.SELLER_PHONE_KIND_PHONE_NUMBER,
    SellerPhoneKind.WHATSAPP_USER_ID: pb.SELLER_PHONE_KIND_WHATSAPP_USER_ID,
}
SENDER_ROLES = {SenderRole.SELLER: pb.SENDER_ROLE_SELLER, SenderRole.CLIENT: pb.SENDER_ROLE_CLIENT}
# How Twilio writes an address of each channel in `To`/`From` (SMS has no prefix).
ADDRESS_PREFIXES = {
    address_pb2.CHANNEL_WHATSAPP: "whatsapp:",
    address_pb2.CHANNEL_SMS: "",
    address_pb2.CHANNEL_MESSENGER: "messenger:",
}


def tenant(value: Tenant) -> pb.Tenant:
    return pb.Tenant(
        tenant_id=value.tenant_id,
        display_name=value.display_name,
        create_time=timestamp(value.created_at),
    )


def channel(value: Channel) -> pb.Channel:
    return pb.Channel(
        channel_id=str(value.channel_id),
        tenant_id=value.tenant_id,
        kind=CHANNEL_KINDS[value.address.kind],
        address=value.address.canonical,
        account_sid=value.account_sid,
        create_time=timestamp(value.created_at),
        alphanumeric_sender_id=value.alphanumeric_sender_id or "",
    )


def seller_phone(value: SellerPhone) -> pb.SellerPhone:
    return pb.SellerPhone(
        seller_phone_id=str(value.seller_phone_id),
        tenant_id=value.tenant_id,
        kind=SELLER_PHONE_KINDS[value.address.kind],
        address=value.address.value,
        create_time=timestamp(value.created_at),
    )


def audit_record(value: AuditRecord) -> pb.AuditRecord:
    record = pb.AuditRecord(
        occurred_at=timestamp(value.occurred_at),
        tenant_id=value.tenant_id,
        actor=value.actor,
        action=value.action,
        target=value.target,
        event_id=value.event_id,
    )
    record.details.update(value.details)
    return record
