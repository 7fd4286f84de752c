"""ResolveSender: Messaging Service SID first, then (AccountSid, To); seller or client."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import pytest
from snapsell.common.v1 import address_pb2
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from tests.integration.seller_admin.conftest import (
    ACCOUNT_SID,
    OTHER_ACCOUNT_SID,
    Metadata,
    add_channel,
    add_seller,
    create_tenant,
    new_business_number,
    new_mobile,
)
from tools.dev_keys import DevKeys

Stub = seller_admin_pb2_grpc.SellerAdminServiceStub
WHATSAPP, SMS = address_pb2.CHANNEL_WHATSAPP, address_pb2.CHANNEL_SMS


def address(channel: address_pb2.Channel.ValueType, value: str) -> address_pb2.Address:
    return address_pb2.Address(channel=channel, value=value)


def new_messaging_service_sid() -> str:
    return "MG" + uuid.uuid4().hex


@pytest.fixture(scope="module")
async def admin_token(token_keys: DevKeys) -> Metadata:
    return (("authorization", f"Bearer {token_keys.token('admin', sub='ops')}"),)


@pytest.fixture(scope="module")
async def shops(stub: Stub, admin_token: Metadata) -> None:
    for tenant_id in ("resolve-a", "resolve-b"):
        await create_tenant(stub, admin_token, tenant_id)


@pytest.fixture
def service(bearer: Callable[..., Metadata]) -> Metadata:
    return bearer("service", sub="routing")


async def test_seller_and_client_on_a_whatsapp_number(
    stub: Stub, shops: None, admin: Metadata, service: Metadata
) -> None:
    number = new_business_number()
    channel = await add_channel(stub, admin, "resolve-a", f"whatsapp:{number}")
    seller = await add_seller(stub, admin, "resolve-a", new_mobile())
    request = pb.ResolveSenderRequest(
        recipient=address(WHATSAPP, number),
        sender=address(WHATSAPP, seller.address),
        account_sid=ACCOUNT_SID,
    )
    reply = await stub.ResolveSender(request, metadata=service)
    assert (reply.tenant_id, reply.sender_role, reply.channel_id) == (
        "resolve-a",
        pb.SENDER_ROLE_SELLER,
        channel.channel_id,
    )
    request.sender.value = new_mobile()
    reply = await stub.ResolveSender(request, metadata=service)
    assert (reply.tenant_id, reply.sender_role) == ("resolve-a", pb.SENDER_ROLE_CLIENT)


async def test_messaging_service_wins_over_the_number_of_its_pool(
    stub: Stub, shops: None, admin: Metadata, service: Metadata
) -> None:
    # A number of tenant B's pool is also registered (wrongly) as tenant A's own sender:
    # the Messaging Service Twilio names in the webhook decides.
    number = new_business_number()
    sid = new_messaging_service_sid()
    await add_channel(stub, admin, "resolve-a", f"whatsapp:{number}")
    pool_channel = await add_channel(stub, admin, "resolve-b", sid)
    reply = await stub.ResolveSender(
        pb.ResolveSenderRequest(
            recipient=address(WHATSAPP, number),
            sender=address(WHATSAPP, new_mobile()),
            account_sid=ACCOUNT_SID,
            messaging_service_sid=sid,
        ),
        metadata=service,
    )
    assert (reply.tenant_id, reply.channel_id) == ("resolve-b", pool_channel.channel_id)


async def test_any_number_of_a_registered_messaging_service_resolves(
    stub: Stub, shops: None, admin: Metadata, service: Metadata
) -> None:
    sid = new_messaging_service_sid()
    await add_channel(stub, admin, "resolve-b", sid)
    seller = await add_seller(stub, admin, "resolve-b", new_mobile())
    reply = await stub.ResolveSender(
        pb.ResolveSenderRequest(
            recipient=address(SMS, new_business_number()),  # never registered by itself
            sender=address(SMS, seller.address),
            account_sid=ACCOUNT_SID,
            messaging_service_sid=sid,
        ),
        metadata=service,
    )
    assert (reply.tenant_id, reply.sender_role) == ("resolve-b", pb.SENDER_ROLE_SELLER)


async def test_an_unknown_messaging_service_falls_back_to_the_number(
    stub: Stub, shops: None, admin: Metadata, service: Metadata
) -> None:
    number = new_business_number()
    await add_channel(stub, admin, "resolve-a", number)
    reply = await stub.ResolveSender(
        pb.ResolveSenderRequest(
            recipient=address(SMS, number),
            sender=address(SMS, new_mobile()),
            account_sid=ACCOUNT_SID,
            messaging_service_sid=new_messaging_service_sid(),
        ),
        metadata=service,
    )
    assert reply.tenant_id == "resolve-a"


async def test_sellers_registered_by_whatsapp_user_id_are_recognised(
    stub: Stub, shops: None, admin: Metadata, service: Metadata
) -> None:
    number = new_business_number()
    await add_channel(stub, admin, "resolve-a", f"whatsapp:{number}")
    user_id = f"FR.{uuid.uuid4().hex}"
    await stub.AddSellerPhone(
        pb.AddSellerPhoneRequest(tenant_id="resolve-a", whatsapp_user_id=user_id), metadata=admin
    )
    by_sender = pb.ResolveSenderRequest(
        recipient=address(WHATSAPP, number),
        sender=address(WHATSAPP, user_id),
        account_sid=ACCOUNT_SID,
    )
    by_field = pb.ResolveSenderRequest(
        recipient=address(WHATSAPP, number),
        sender=address(WHATSAPP, new_mobile()),
        account_sid=ACCOUNT_SID,
        sender_whatsapp_user_id=user_id,
    )
    for request in (by_sender, by_field):
        reply = await stub.ResolveSender(request, metadata=service)
        assert reply.sender_role == pb.SENDER_ROLE_SELLER


async def test_unknown_receiving_channels_are_not_found(
    stub: Stub, shops: None, admin: Metadata, service: Metadata
) -> None:
    number = new_business_number()
    await add_channel(stub, admin, "resolve-a", f"whatsapp:{number}")
    cases = [
        # Never registered.
        (address(WHATSAPP, new_business_number()), ACCOUNT_SID),
        # Registered for WhatsApp, not for SMS.
        (address(SMS, number), ACCOUNT_SID),
        # Registered under another Twilio account.
        (address(WHATSAPP, number), OTHER_ACCOUNT_SID),
    ]
    for recipient, account_sid in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ResolveSender(
                pb.ResolveSenderRequest(
                    recipient=recipient,
                    sender=address(WHATSAPP, new_mobile()),
                    account_sid=account_sid,
                ),
                metadata=service,
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no tenant receives on" in (caught.value.details() or "")


async def test_incomplete_requests_are_invalid_argument(stub: Stub, service: Metadata) -> None:
    complete = pb.ResolveSenderRequest(
        recipient=address(WHATSAPP, "+14155238886"),
        sender=address(WHATSAPP, "+33612345678"),
        account_sid=ACCOUNT_SID,
    )
    without_recipient = pb.ResolveSenderRequest()
    without_recipient.CopyFrom(complete)
    without_recipient.ClearField("recipient")
    without_account = pb.ResolveSenderRequest()
    without_account.CopyFrom(complete)
    without_account.account_sid = ""
    without_sender = pb.ResolveSenderRequest()
    without_sender.CopyFrom(complete)
    without_sender.ClearField("sender")
    for request in (without_recipient, without_account, without_sender):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ResolveSender(request, metadata=service)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
