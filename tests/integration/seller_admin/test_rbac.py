"""Every RPC x every caller (five roles and five kinds of bad token) x own/other tenant, over a
real socket through the production auth interceptor, with the effect (or its absence) checked.

`RBAC_TABLE` is written out by hand, independently of `services.seller_admin.access`, so a wrong
policy fails here; a test fails when the proto declares an RPC the table has no rows for."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import jwt
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.common.v1 import address_pb2
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra.auth import issue_token
from infra.keys import new_signing_key
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

OWN, OTHER = "own", "other"
BOTH = frozenset({OWN, OTHER})
TENANT_A, TENANT_B = "rbac-a", "rbac-b"  # tenant-role tokens belong to TENANT_A
ROLES = ("admin", "owner", "manager", "staff", "service")
BAD_TOKENS = ("no_token", "expired", "forged", "alg_none", "malformed")

# rpc -> role -> the scopes in which that role's call succeeds; any other call is refused.
RBAC_TABLE: dict[str, dict[str, frozenset[str]]] = {
    "CreateTenant": {"admin": BOTH},
    "GetTenant": {"admin": BOTH},
    "ListTenants": {"admin": BOTH},
    "AddChannel": {"admin": BOTH},
    "RemoveChannel": {"admin": BOTH},
    # The service caller here is routing; only the outbox may list a tenant's channels.
    "ListChannels": {"admin": BOTH, "owner": frozenset({OWN})},
    "AddSellerPhone": {"admin": BOTH, "owner": frozenset({OWN}), "manager": frozenset({OWN})},
    "RemoveSellerPhone": {
        "admin": BOTH,
        "owner": frozenset({OWN}),
        "manager": frozenset({OWN}),
    },
    "ListSellerPhones": {
        "admin": BOTH,
        "owner": frozenset({OWN}),
        "manager": frozenset({OWN}),
        "staff": frozenset({OWN}),
        # Routing keeps each channel's seller phones to tell sellers from clients itself.
        "service": BOTH,
    },
    "ResolveSender": {"service": BOTH},
    "ListAuditRecords": {"admin": BOTH, "owner": frozenset({OWN})},
}

CASES = [
    (rpc, caller, scope)
    for rpc in RBAC_TABLE
    for caller in (*ROLES, *BAD_TOKENS)
    for scope in (OWN, OTHER)
]


def expected_code(rpc: str, caller: str, scope: str) -> grpc.StatusCode:
    if caller in BAD_TOKENS:
        return grpc.StatusCode.UNAUTHENTICATED
    if scope in RBAC_TABLE[rpc].get(caller, frozenset()):
        return grpc.StatusCode.OK
    return grpc.StatusCode.PERMISSION_DENIED


def test_every_rpc_of_the_proto_has_rows_in_the_rbac_table() -> None:
    service = pb.DESCRIPTOR.services_by_name["SellerAdminService"]
    declared = {method.name for method in service.methods}
    covered = {rpc for rpc, _, _ in CASES}
    assert declared - covered == set(), "RPCs without RBAC rows"
    assert covered - declared == set(), "RBAC rows for RPCs the proto does not declare"
    assert set(CALLS) == declared, "RPCs without a request builder"


@dataclass(frozen=True)
class Fixture:
    stub: Stub
    admin: Metadata
    # The WhatsApp channel of each tenant, for ResolveSender.
    channels: dict[str, pb.Channel]


# A call: builds the request for the target tenant (doing any set-up as admin), and returns it
# with a check of the outcome's effect: `check(succeeded)`.
Check = Callable[[bool], Awaitable[None]]
Call = Callable[[Fixture, str], Awaitable[tuple[object, Check]]]


async def _nothing(_: bool) -> None:
    return None


async def _create_tenant(fx: Fixture, target: str) -> tuple[object, Check]:
    tenant_id = f"rbac-new-{uuid.uuid4().hex[:8]}"

    async def check(succeeded: bool) -> None:
        listed = await fx.stub.ListTenants(pb.ListTenantsRequest(page_size=500), metadata=fx.admin)
        assert (tenant_id in {t.tenant_id for t in listed.tenants}) is succeeded

    return pb.CreateTenantRequest(tenant_id=tenant_id, display_name="New shop"), check


async def _get_tenant(fx: Fixture, target: str) -> tuple[object, Check]:
    return pb.GetTenantRequest(tenant_id=target), _nothing


async def _list_tenants(fx: Fixture, target: str) -> tuple[object, Check]:
    return pb.ListTenantsRequest(page_size=10), _nothing


async def _channels_of(fx: Fixture, tenant_id: str) -> set[str]:
    reply = await fx.stub.ListChannels(
        pb.ListChannelsRequest(tenant_id=tenant_id, page_size=500), metadata=fx.admin
    )
    return {channel.address for channel in reply.channels}


async def _add_channel(fx: Fixture, target: str) -> tuple[object, Check]:
    address = f"whatsapp:{new_business_number()}"

    async def check(succeeded: bool) -> None:
        assert (address in await _channels_of(fx, target)) is succeeded

    request = pb.AddChannelRequest(tenant_id=target, address=address, account_sid=ACCOUNT_SID)
    return request, check


async def _remove_channel(fx: Fixture, target: str) -> tuple[object, Check]:
    channel = await add_channel(fx.stub, fx.admin, target, new_business_number())

    async def check(succeeded: bool) -> None:
        assert (channel.address in await _channels_of(fx, target)) is not succeeded

    return pb.RemoveChannelRequest(tenant_id=target, address=channel.address), check


async def _list_channels(fx: Fixture, target: str) -> tuple[object, Check]:
    return pb.ListChannelsRequest(tenant_id=target), _nothing


async def _sellers_of(fx: Fixture, tenant_id: str) -> set[str]:
    reply = await fx.stub.ListSellerPhones(
        pb.ListSellerPhonesRequest(tenant_id=tenant_id, page_size=500), metadata=fx.admin
    )
    return {phone.address for phone in reply.seller_phones}


async def _add_seller_phone(fx: Fixture, target: str) -> tuple[object, Check]:
    number = new_mobile()

    async def check(succeeded: bool) -> None:
        assert (number in await _sellers_of(fx, target)) is succeeded

    return pb.AddSellerPhoneRequest(tenant_id=target, phone_number=number), check


async def _remove_seller_phone(fx: Fixture, target: str) -> tuple[object, Check]:
    phone = await add_seller(fx.stub, fx.admin, target, new_mobile())

    async def check(succeeded: bool) -> None:
        assert (phone.address in await _sellers_of(fx, target)) is not succeeded

    return pb.RemoveSellerPhoneRequest(tenant_id=target, phone_number=phone.address), check


async def _list_seller_phones(fx: Fixture, target: str) -> tuple[object, Check]:
    return pb.ListSellerPhonesRequest(tenant_id=target), _nothing


async def _resolve_sender(fx: Fixture, target: str) -> tuple[object, Check]:
    number = fx.channels[target].address.removeprefix("whatsapp:")
    request = pb.ResolveSenderRequest(
        recipient=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=number),
        sender=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=new_mobile()),
        account_sid=ACCOUNT_SID,
    )
    return request, _nothing


async def _list_audit_records(fx: Fixture, target: str) -> tuple[object, Check]:
    return pb.ListAuditRecordsRequest(tenant_id=target, since=Timestamp(seconds=0)), _nothing


CALLS: dict[str, Call] = {
    "CreateTenant": _create_tenant,
    "GetTenant": _get_tenant,
    "ListTenants": _list_tenants,
    "AddChannel": _add_channel,
    "RemoveChannel": _remove_channel,
    "ListChannels": _list_channels,
    "AddSellerPhone": _add_seller_phone,
    "RemoveSellerPhone": _remove_seller_phone,
    "ListSellerPhones": _list_seller_phones,
    "ResolveSender": _resolve_sender,
    "ListAuditRecords": _list_audit_records,
}


@pytest.fixture(scope="module")
async def tenants(stub: Stub, token_keys: DevKeys) -> dict[str, pb.Channel]:
    admin = (("authorization", f"Bearer {token_keys.token('admin', sub='ops')}"),)
    channels = {}
    for tenant_id in (TENANT_A, TENANT_B):
        await create_tenant(stub, admin, tenant_id)
        await add_seller(stub, admin, tenant_id, new_mobile())
        channels[tenant_id] = await add_channel(
            stub, admin, tenant_id, f"whatsapp:{new_business_number()}"
        )
    return channels


def caller_metadata(caller: str, token_keys: DevKeys) -> Metadata:
    if caller in ROLES:
        tenant_id = TENANT_A if caller in ("owner", "manager", "staff") else None
        sub = "routing" if caller == "service" else f"rbac-{caller}"
        token = token_keys.token(caller, tenant_id, sub, audience="seller_admin")
    elif caller == "no_token":
        return ()
    elif caller == "expired":
        token = token_keys.token("admin", sub="rbac", audience="seller_admin", ttl_s=-300)
    elif caller == "forged":
        token = issue_token(new_signing_key("operator"), sub="rbac", role="admin", audience="x")
    elif caller == "alg_none":
        claims = {"sub": "rbac", "role": "admin", "exp": int(time.time()) + 600}
        token = jwt.encode(claims, None, algorithm="none")
    else:
        token = "not-a-jwt"
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize(("rpc", "caller", "scope"), CASES)
async def test_rbac(
    rpc: str,
    caller: str,
    scope: str,
    stub: Stub,
    tenants: dict[str, pb.Channel],
    token_keys: DevKeys,
    admin: Metadata,
) -> None:
    fx = Fixture(stub, admin, tenants)
    target = TENANT_A if scope == OWN else TENANT_B
    request, check = await CALLS[rpc](fx, target)
    method = getattr(stub, rpc)
    try:
        reply = await method(request, metadata=caller_metadata(caller, token_keys))
    except grpc.aio.AioRpcError as error:
        code, details = error.code(), error.details() or ""
        reply = None
    else:
        code, details = grpc.StatusCode.OK, ""
    assert code == expected_code(rpc, caller, scope), details
    assert "Traceback" not in details and "\n" not in details
    await check(code == grpc.StatusCode.OK)
    if code != grpc.StatusCode.OK:
        return
    # What a tenant role may see is its own tenant's, whatever it asked for.
    if caller in ("owner", "manager", "staff"):
        for item in getattr(reply, "seller_phones", []) or getattr(reply, "channels", []):
            assert item.tenant_id == TENANT_A
    if rpc == "ResolveSender":
        assert reply.tenant_id == target
        assert reply.sender_role == pb.SENDER_ROLE_CLIENT
