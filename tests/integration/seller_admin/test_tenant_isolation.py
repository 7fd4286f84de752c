"""Tenant A's data is never visible to, nor changeable by, a token of tenant B, through any RPC."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest
from snapsell.common.v1 import address_pb2
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from tests.integration.seller_admin.conftest import (
    ACCOUNT_SID,
    Metadata,
    add_channel,
    add_seller,
    create_tenant,
    new_business_number,
    new_mobile,
)
from tools.dev_keys import DevKeys

Stub = seller_admin_pb2_grpc.SellerAdminServiceStub
A, B = "iso-a", "iso-b"


@dataclass(frozen=True)
class Shops:
    a_seller: pb.SellerPhone
    a_channel: pb.Channel
    b_seller: pb.SellerPhone


@pytest.fixture(scope="module")
async def shops(stub: Stub, token_keys: DevKeys) -> Shops:
    admin = (("authorization", f"Bearer {token_keys.token('admin', sub='ops')}"),)
    await create_tenant(stub, admin, A)
    await create_tenant(stub, admin, B)
    return Shops(
        a_seller=await add_seller(stub, admin, A, new_mobile()),
        a_channel=await add_channel(stub, admin, A, f"whatsapp:{new_business_number()}"),
        b_seller=await add_seller(stub, admin, B, new_mobile()),
    )


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def sellers(stub: Stub, admin: Metadata, tenant_id: str) -> set[str]:
    reply = await stub.ListSellerPhones(
        pb.ListSellerPhonesRequest(tenant_id=tenant_id), metadata=admin
    )
    return {p.address for p in reply.seller_phones}


@pytest.mark.parametrize("role", ["owner", "manager", "staff"])
async def test_lists_of_tenant_b_never_show_tenant_a(
    role: str, stub: Stub, shops: Shops, bearer: Callable[..., Metadata]
) -> None:
    b_token = bearer(role, B)
    reply = await stub.ListSellerPhones(pb.ListSellerPhonesRequest(), metadata=b_token)
    assert [p.address for p in reply.seller_phones] == [shops.b_seller.address]
    assert {p.tenant_id for p in reply.seller_phones} == {B}
    naming_a = stub.ListSellerPhones(pb.ListSellerPhonesRequest(tenant_id=A), metadata=b_token)
    assert await code_of(naming_a) == grpc.StatusCode.PERMISSION_DENIED
    if role == "owner":
        channels = await stub.ListChannels(pb.ListChannelsRequest(), metadata=b_token)
        assert list(channels.channels) == []
        naming_a = stub.ListChannels(pb.ListChannelsRequest(tenant_id=A), metadata=b_token)
        assert await code_of(naming_a) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("role", ["owner", "manager"])
async def test_tenant_b_cannot_remove_or_touch_tenant_a_sellers(
    role: str,
    stub: Stub,
    shops: Shops,
    bearer: Callable[..., Metadata],
    admin: Metadata,
) -> None:
    b_token = bearer(role, B)
    a_number = shops.a_seller.address
    # Without a tenant_id the call acts on B, which has no such seller.
    remove = stub.RemoveSellerPhone(
        pb.RemoveSellerPhoneRequest(phone_number=a_number), metadata=b_token
    )
    assert await code_of(remove) == grpc.StatusCode.NOT_FOUND
    remove = stub.RemoveSellerPhone(
        pb.RemoveSellerPhoneRequest(tenant_id=A, phone_number=a_number), metadata=b_token
    )
    assert await code_of(remove) == grpc.StatusCode.PERMISSION_DENIED
    add = stub.AddSellerPhone(
        pb.AddSellerPhoneRequest(tenant_id=A, phone_number=new_mobile()), metadata=b_token
    )
    assert await code_of(add) == grpc.StatusCode.PERMISSION_DENIED
    assert await sellers(stub, admin, A) == {a_number}


async def test_the_same_number_registered_by_b_is_b_own_entry(
    stub: Stub, shops: Shops, bearer: Callable[..., Metadata], admin: Metadata
) -> None:
    a_number = shops.a_seller.address
    b_owner = bearer("owner", B)
    added = await stub.AddSellerPhone(
        pb.AddSellerPhoneRequest(phone_number=a_number), metadata=b_owner
    )
    assert added.created and added.seller_phone.tenant_id == B
    assert added.seller_phone.seller_phone_id != shops.a_seller.seller_phone_id
    await stub.RemoveSellerPhone(
        pb.RemoveSellerPhoneRequest(phone_number=a_number), metadata=b_owner
    )
    assert a_number in await sellers(stub, admin, A)


async def test_a_seller_of_a_writing_to_b_is_a_client_of_b(
    stub: Stub, shops: Shops, bearer: Callable[..., Metadata], admin: Metadata
) -> None:
    b_channel = await add_channel(stub, admin, B, f"whatsapp:{new_business_number()}")
    a_seller = shops.a_seller

    async def resolve(channel: pb.Channel) -> pb.ResolveSenderResponse:
        return await stub.ResolveSender(
            pb.ResolveSenderRequest(
                recipient=address_pb2.Address(
                    channel=address_pb2.CHANNEL_WHATSAPP,
                    value=channel.address.removeprefix("whatsapp:"),
                ),
                sender=address_pb2.Address(
                    channel=address_pb2.CHANNEL_WHATSAPP, value=a_seller.address
                ),
                account_sid=ACCOUNT_SID,
            ),
            metadata=bearer("service", sub="routing"),
        )

    to_b = await resolve(b_channel)
    assert (to_b.tenant_id, to_b.sender_role) == (B, pb.SENDER_ROLE_CLIENT)
    to_a = await resolve(shops.a_channel)
    assert (to_a.tenant_id, to_a.sender_role) == (A, pb.SENDER_ROLE_SELLER)
