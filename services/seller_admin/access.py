"""Access control of SellerAdminService as data: which roles and services may call each RPC,
and which tenant a caller acts on. `infra.auth.AuthInterceptor` enforces `auth_policy()` before the
servicer runs; the servicer calls `scoped_tenant` for every tenant-scoped request."""

from __future__ import annotations

from collections.abc import Mapping

from infra.auth import Access
from services.seller_admin.domain import (
    InvalidArgumentError,
    PermissionDeniedError,
    validate_tenant_id,
)

SERVICE_FULL_NAME = "snapsell.seller_admin.v1.SellerAdminService"

ADMIN, OWNER, MANAGER, STAFF, SERVICE = "admin", "owner", "manager", "staff", "service"
TENANT_ROLES = frozenset({OWNER, MANAGER, STAFF})
# Roles not bound to one tenant: they must name the tenant they act on.
PLATFORM_ROLES = frozenset({ADMIN, SERVICE})

# Which human roles may call each RPC. Every RPC of the service must appear here: the auth
# interceptor denies anything absent, and a test fails when the proto and this table differ.
RPC_ROLES: Mapping[str, frozenset[str]] = {
    "CreateTenant": frozenset({ADMIN}),
    "GetTenant": frozenset({ADMIN}),
    "ListTenants": frozenset({ADMIN}),
    "AddChannel": frozenset({ADMIN}),
    "RemoveChannel": frozenset({ADMIN}),
    "ListChannels": frozenset({ADMIN, OWNER}),
    "AddSellerPhone": frozenset({ADMIN, OWNER, MANAGER}),
    "RemoveSellerPhone": frozenset({ADMIN, OWNER, MANAGER}),
    "ListSellerPhones": frozenset({ADMIN, OWNER, MANAGER, STAFF}),
    "ResolveSender": frozenset(),
    # Who changed what: the platform's operators, and a shop's owner for its own shop.
    "ListAuditRecords": frozenset({ADMIN, OWNER}),
}
# Which services may call each RPC (by identity): routing resolves the channel of inbound
# messages and keeps its tenant's seller phones to tell sellers from clients; the outbox checks
# that a message's sender is a channel of its tenant.
RPC_SERVICES: Mapping[str, frozenset[str]] = {
    "ResolveSender": frozenset({"routing"}),
    "ListSellerPhones": frozenset({"routing"}),
    "ListChannels": frozenset({"outbox"}),
}


def method_path(rpc: str) -> str:
    """The full gRPC method name the auth interceptor keys its policy on."""
    return f"/{SERVICE_FULL_NAME}/{rpc}"


def auth_policy() -> dict[str, Access]:
    return {
        method_path(rpc): Access(roles=roles, services=RPC_SERVICES.get(rpc, frozenset()))
        for rpc, roles in RPC_ROLES.items()
    }


def scoped_tenant(role: str, token_tenant_id: str | None, requested_tenant_id: str) -> str:
    """The tenant a caller acts on: tenant roles only their own (empty request = "mine"),
    platform roles any tenant they name."""
    requested = requested_tenant_id.strip()
    if role in TENANT_ROLES:
        if not token_tenant_id:
            raise PermissionDeniedError(f"role '{role}' token carries no tenant_id")
        if requested and requested != token_tenant_id:
            raise PermissionDeniedError(f"role '{role}' may not act on another tenant")
        return token_tenant_id
    if role not in PLATFORM_ROLES:
        raise PermissionDeniedError(f"role '{role}' may not act on a tenant")
    if not requested:
        raise InvalidArgumentError("tenant_id is required")
    return validate_tenant_id(requested)
