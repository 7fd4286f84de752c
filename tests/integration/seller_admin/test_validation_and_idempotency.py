"""Validation messages, idempotent adds, NOT_FOUND removals and keyset pagination over gRPC."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import grpc
import pytest
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from tests.integration.seller_admin.conftest import (
    ACCOUNT_SID,
    OTHER_ACCOUNT_SID,
    Metadata,
    add_channel,
    create_tenant,
    new_business_number,
    new_mobile,
)
from tools.dev_keys import DevKeys

Stub = seller_admin_pb2_grpc.SellerAdminServiceStub


async def failure(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call succeeded")


@pytest.fixture(scope="module")
async def shop(stub: Stub, token_keys: DevKeys) -> str:
    admin = (("authorization", f"Bearer {token_keys.token('admin', sub='ops')}"),)
    await create_tenant(stub, admin, "valid-shop")
    await create_tenant(stub, admin, "valid-other")
    return "valid-shop"


async def test_adding_a_formatted_number_stores_e164_once(
    stub: Stub, shop: str, bearer: Callable[..., Metadata]
) -> None:
    owner = bearer("owner", shop)
    first = await stub.AddSellerPhone(
        pb.AddSellerPhoneRequest(phone_number="+33 6 99 88 77 66"), metadata=owner
    )
    assert first.created
    assert first.seller_phone.address == "+33699887766"
    assert first.seller_phone.kind == pb.SELLER_PHONE_KIND_PHONE_NUMBER
    again = await stub.AddSellerPhone(
        pb.AddSellerPhoneRequest(phone_number="+33699887766"), metadata=owner
    )
    assert not again.created
    assert again.seller_phone == first.seller_phone


async def test_concurrent_adds_of_one_number_create_one_entry(
    stub: Stub, shop: str, bearer: Callable[..., Metadata]
) -> None:
    number = new_mobile()
    request = pb.AddSellerPhoneRequest(tenant_id=shop, phone_number=number)
    replies = await asyncio.gather(
        *(stub.AddSellerPhone(request, metadata=bearer("manager", shop)) for _ in range(8))
    )
    assert sum(reply.created for reply in replies) == 1
    assert len({reply.seller_phone.seller_phone_id for reply in replies}) == 1


async def test_sellers_may_be_registered_by_whatsapp_user_id(
    stub: Stub, shop: str, bearer: Callable[..., Metadata]
) -> None:
    owner = bearer("owner", shop)
    added = await stub.AddSellerPhone(
        pb.AddSellerPhoneRequest(whatsapp_user_id="us.13491208655302741918"), metadata=owner
    )
    assert added.created
    assert added.seller_phone.address == "US.13491208655302741918"
    assert added.seller_phone.kind == pb.SELLER_PHONE_KIND_WHATSAPP_USER_ID
    removed = await stub.RemoveSellerPhone(
        pb.RemoveSellerPhoneRequest(whatsapp_user_id="US.13491208655302741918"), metadata=owner
    )
    assert removed.seller_phone.seller_phone_id == added.seller_phone.seller_phone_id


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.AddSellerPhoneRequest(phone_number="06 12 34 56 78"), "must start with +"),
        (pb.AddSellerPhoneRequest(phone_number="+3361234"), "is too short"),
        (pb.AddSellerPhoneRequest(phone_number="+1 555 555 5555"), "is not a valid number"),
        (pb.AddSellerPhoneRequest(phone_number="+33 6 12 34 56 78\nx"), "contains letters"),
        (pb.AddSellerPhoneRequest(whatsapp_user_id="+33612345678"), "looks like a phone"),
        (pb.AddSellerPhoneRequest(), "phone_number or whatsapp_user_id is required"),
        (pb.RemoveSellerPhoneRequest(phone_number="12"), "must start with +"),
    ],
)
async def test_invalid_seller_numbers_are_invalid_argument_saying_why(
    request_: pb.AddSellerPhoneRequest | pb.RemoveSellerPhoneRequest,
    message: str,
    stub: Stub,
    shop: str,
    bearer: Callable[..., Metadata],
) -> None:
    owner = bearer("owner", shop)
    if isinstance(request_, pb.AddSellerPhoneRequest):
        call = stub.AddSellerPhone(request_, metadata=owner)
    else:
        call = stub.RemoveSellerPhone(request_, metadata=owner)
    code, details = await failure(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(re.escape(message), details)
    assert "\n" not in details


async def test_removing_a_missing_seller_is_not_found(
    stub: Stub, shop: str, bearer: Callable[..., Metadata]
) -> None:
    owner = bearer("owner", shop)
    number = new_mobile()
    await stub.AddSellerPhone(pb.AddSellerPhoneRequest(phone_number=number), metadata=owner)
    await stub.RemoveSellerPhone(pb.RemoveSellerPhoneRequest(phone_number=number), metadata=owner)
    code, details = await failure(
        stub.RemoveSellerPhone(pb.RemoveSellerPhoneRequest(phone_number=number), metadata=owner)
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert "is not a seller of tenant valid-shop" in details


async def test_unknown_tenants_are_not_found(stub: Stub, admin: Metadata) -> None:
    for call in (
        stub.GetTenant(pb.GetTenantRequest(tenant_id="nobody"), metadata=admin),
        stub.ListSellerPhones(pb.ListSellerPhonesRequest(tenant_id="nobody"), metadata=admin),
        stub.ListChannels(pb.ListChannelsRequest(tenant_id="nobody"), metadata=admin),
        stub.AddSellerPhone(
            pb.AddSellerPhoneRequest(tenant_id="nobody", phone_number=new_mobile()),
            metadata=admin,
        ),
        stub.AddChannel(
            pb.AddChannelRequest(
                tenant_id="nobody", address=new_business_number(), account_sid=ACCOUNT_SID
            ),
            metadata=admin,
        ),
    ):
        code, details = await failure(call)
        assert (code, details) == (grpc.StatusCode.NOT_FOUND, "tenant nobody does not exist")


async def test_admin_must_name_the_tenant(stub: Stub, admin: Metadata) -> None:
    code, details = await failure(
        stub.ListSellerPhones(pb.ListSellerPhonesRequest(), metadata=admin)
    )
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "tenant_id is required")


async def test_create_tenant_is_idempotent_for_the_same_request(
    stub: Stub, admin: Metadata
) -> None:
    request = pb.CreateTenantRequest(tenant_id="chez-marie", display_name="Chez Marie")
    first = await stub.CreateTenant(request, metadata=admin)
    again = await stub.CreateTenant(request, metadata=admin)
    assert first.created and not again.created
    assert again.tenant == first.tenant
    code, _ = await failure(
        stub.CreateTenant(
            pb.CreateTenantRequest(tenant_id="chez-marie", display_name="Other"), metadata=admin
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    generated = await stub.CreateTenant(
        pb.CreateTenantRequest(display_name="No slug"), metadata=admin
    )
    assert generated.created and generated.tenant.tenant_id
    code, details = await failure(
        stub.CreateTenant(
            pb.CreateTenantRequest(tenant_id="Bad Id", display_name="x"), metadata=admin
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tenant_id" in details


async def test_a_channel_belongs_to_one_tenant(stub: Stub, shop: str, admin: Metadata) -> None:
    number = new_business_number()
    first = await stub.AddChannel(
        pb.AddChannelRequest(tenant_id=shop, address=f"WhatsApp:{number}", account_sid=ACCOUNT_SID),
        metadata=admin,
    )
    assert first.created
    assert first.channel.address == f"whatsapp:{number}"
    assert first.channel.kind == pb.CHANNEL_KIND_WHATSAPP
    again = await add_channel(stub, admin, shop, f"whatsapp:{number}")
    assert again == first.channel
    code, details = await failure(
        stub.AddChannel(
            pb.AddChannelRequest(
                tenant_id="valid-other", address=f"whatsapp:{number}", account_sid=ACCOUNT_SID
            ),
            metadata=admin,
        )
    )
    assert (code, details) == (
        grpc.StatusCode.ALREADY_EXISTS,
        f"whatsapp:{number} belongs to another tenant",
    )
    code, _ = await failure(
        stub.AddChannel(
            pb.AddChannelRequest(
                tenant_id=shop, address=f"whatsapp:{number}", account_sid=OTHER_ACCOUNT_SID
            ),
            metadata=admin,
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    # The SMS number with the same digits is another channel.
    sms = await add_channel(stub, admin, "valid-other", number)
    assert sms.kind == pb.CHANNEL_KIND_SMS


async def test_messaging_service_channels_and_their_removal(
    stub: Stub, shop: str, admin: Metadata
) -> None:
    sid = "MG" + "c3" * 16
    channel = await add_channel(stub, admin, shop, "MG" + "C3" * 16)
    assert channel.kind == pb.CHANNEL_KIND_MESSAGING_SERVICE
    assert channel.address == sid
    removed = await stub.RemoveChannel(
        pb.RemoveChannelRequest(tenant_id=shop, address=sid), metadata=admin
    )
    assert removed.channel == channel
    code, _ = await failure(
        stub.RemoveChannel(pb.RemoveChannelRequest(tenant_id=shop, address=sid), metadata=admin)
    )
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("address", "account_sid", "message"),
    [
        ("messenger:123", ACCOUNT_SID, "is not supported"),
        ("MG123", ACCOUNT_SID, "MG followed by 32 hex digits"),
        ("whatsapp:+1", ACCOUNT_SID, "phone number"),
        ("+14155238886", "AC123", "account_sid"),
    ],
)
async def test_invalid_channels_are_invalid_argument(
    address: str, account_sid: str, message: str, stub: Stub, shop: str, admin: Metadata
) -> None:
    code, details = await failure(
        stub.AddChannel(
            pb.AddChannelRequest(tenant_id=shop, address=address, account_sid=account_sid),
            metadata=admin,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


async def test_an_sms_channel_may_declare_an_alphanumeric_sender_id_of_its_own(
    stub: Stub, shop: str, admin: Metadata
) -> None:
    def request(tenant: str, address: str, name: str) -> pb.AddChannelRequest:
        return pb.AddChannelRequest(
            tenant_id=tenant, address=address, account_sid=ACCOUNT_SID, alphanumeric_sender_id=name
        )

    number = new_business_number()
    added = await stub.AddChannel(request(shop, number, " Chez Val "), metadata=admin)
    assert added.channel.alphanumeric_sender_id == "Chez Val"
    again = await stub.AddChannel(request(shop, number, "Chez Val"), metadata=admin)
    assert not again.created and again.channel == added.channel
    listed = await stub.ListChannels(
        pb.ListChannelsRequest(tenant_id=shop, page_size=500), metadata=admin
    )
    assert added.channel in listed.channels
    refusals = [
        # Another ID for the same channel.
        (request(shop, number, "Val"), grpc.StatusCode.ALREADY_EXISTS, "alphanumeric sender ID"),
        # Another shop wearing this one's name, whatever its case.
        (
            request("valid-other", new_business_number(), "CHEZ VAL"),
            grpc.StatusCode.ALREADY_EXISTS,
            "belongs to another channel",
        ),
        (
            request(shop, f"whatsapp:{new_business_number()}", "ChezVal"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not WhatsApp",
        ),
        (request(shop, new_business_number(), "1234"), grpc.StatusCode.INVALID_ARGUMENT, "letter"),
        (
            request(shop, new_business_number(), "Chez Valentine"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "1-11 letters",
        ),
    ]
    for refused, expected, message in refusals:
        code, details = await failure(stub.AddChannel(refused, metadata=admin))
        assert code == expected, details
        assert message in details and "\n" not in details


async def test_seller_phones_page_through_every_entry_once_in_order(
    stub: Stub, admin: Metadata, bearer: Callable[..., Metadata]
) -> None:
    await create_tenant(stub, admin, "paged-shop")
    staff = bearer("staff", "paged-shop")
    numbers = sorted(new_mobile() for _ in range(7))
    for number in numbers:
        await stub.AddSellerPhone(
            pb.AddSellerPhoneRequest(tenant_id="paged-shop", phone_number=number), metadata=admin
        )
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListSellerPhones(
            pb.ListSellerPhonesRequest(page_size=3, page_token=token), metadata=staff
        )
        assert len(page.seller_phones) <= 3
        seen += [p.address for p in page.seller_phones]
        token = page.next_page_token
        if not token:
            break
    assert seen == numbers
    code, _ = await failure(
        stub.ListSellerPhones(pb.ListSellerPhonesRequest(page_token="bogus"), metadata=staff)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_channels_and_tenants_page_too(stub: Stub, admin: Metadata) -> None:
    await create_tenant(stub, admin, "paged-channels")
    added = [
        (await add_channel(stub, admin, "paged-channels", new_business_number())).address
        for _ in range(5)
    ]
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListChannels(
            pb.ListChannelsRequest(tenant_id="paged-channels", page_size=2, page_token=token),
            metadata=admin,
        )
        seen += [c.address for c in page.channels]
        token = page.next_page_token
        if not token:
            break
    assert seen == added
    tenants: list[str] = []
    token = ""
    while True:
        page = await stub.ListTenants(
            pb.ListTenantsRequest(page_size=1, page_token=token), metadata=admin
        )
        tenants += [t.tenant_id for t in page.tenants]
        token = page.next_page_token
        if not token:
            break
    assert tenants == sorted(tenants)
    assert {"paged-channels", "valid-shop"} <= set(tenants)
