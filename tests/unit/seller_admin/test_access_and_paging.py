"""The access table against the proto, tenant scoping, and page tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest
from snapsell.seller_admin.v1 import seller_admin_pb2

from infra.auth import ROLES
from infra.page_tokens import InvalidPageTokenError
from services.seller_admin.access import (
    RPC_ROLES,
    SERVICE_FULL_NAME,
    auth_policy,
    scoped_tenant,
)
from services.seller_admin.api import CHANNEL_PAGES, SELLER_PHONE_PAGES
from services.seller_admin.domain import (
    Channel,
    ChannelAddress,
    ChannelKind,
    InvalidArgumentError,
    PermissionDeniedError,
)


def test_access_table_lists_exactly_the_rpcs_of_the_proto() -> None:
    service = seller_admin_pb2.DESCRIPTOR.services_by_name["SellerAdminService"]
    assert service.full_name == SERVICE_FULL_NAME
    assert set(RPC_ROLES) == {method.name for method in service.methods}


def test_policy_names_only_known_roles_and_full_method_paths() -> None:
    for path, access in auth_policy().items():
        assert path.startswith(f"/{SERVICE_FULL_NAME}/")
        assert (access.roles or access.services) and access.roles <= ROLES - {"service"}


def test_resolve_sender_is_for_routing_only_and_tenants_for_admins_only() -> None:
    resolve = auth_policy()[f"/{SERVICE_FULL_NAME}/ResolveSender"]
    assert (resolve.roles, resolve.services) == (set(), {"routing"})
    for rpc in ("CreateTenant", "GetTenant", "ListTenants", "AddChannel", "RemoveChannel"):
        assert RPC_ROLES[rpc] == {"admin"}


@pytest.mark.parametrize("role", ["owner", "manager", "staff"])
def test_tenant_roles_act_on_their_own_tenant(role: str) -> None:
    assert scoped_tenant(role, "shop-a", "") == "shop-a"
    assert scoped_tenant(role, "shop-a", "shop-a") == "shop-a"
    with pytest.raises(PermissionDeniedError, match="another tenant"):
        scoped_tenant(role, "shop-a", "shop-b")
    with pytest.raises(PermissionDeniedError, match="no tenant_id"):
        scoped_tenant(role, None, "shop-a")


@pytest.mark.parametrize("role", ["admin", "service"])
def test_platform_roles_must_name_a_valid_tenant(role: str) -> None:
    assert scoped_tenant(role, None, " shop-b ") == "shop-b"
    with pytest.raises(InvalidArgumentError, match="tenant_id is required"):
        scoped_tenant(role, None, "")
    with pytest.raises(InvalidArgumentError, match="tenant_id"):
        scoped_tenant(role, None, "Shop B")


def test_unknown_roles_act_on_no_tenant() -> None:
    with pytest.raises(PermissionDeniedError):
        scoped_tenant("intruder", None, "shop-a")


def test_channel_page_token_carries_creation_time_and_id() -> None:
    channel = Channel(
        channel_id=uuid4(),
        tenant_id="shop-a",
        address=ChannelAddress(ChannelKind.SMS, "+14155238886"),
        account_sid="AC" + "0" * 32,
        created_at=datetime(2026, 11, 23, 15, 4, 5, 123456, tzinfo=UTC),
    )
    token = CHANNEL_PAGES.encode("shop-a", channel.created_at, channel.channel_id)
    assert CHANNEL_PAGES.decode(token, "shop-a") == (channel.created_at, channel.channel_id)
    assert CHANNEL_PAGES.decode("", "shop-a") is None
    for forged in (SELLER_PHONE_PAGES.encode("shop-a", "+33611111111"), "garbage!"):
        with pytest.raises(InvalidPageTokenError, match="page_token"):
            CHANNEL_PAGES.decode(forged, "shop-a")
