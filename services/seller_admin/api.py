"""The gRPC servicer of `snapsell.seller_admin.v1.SellerAdminService`.

Each RPC translates the request, applies the domain rules, runs the store calls and their audit
event in one transaction, and translates the result. Roles are checked before any of this by
`infra.auth.AuthInterceptor` with `access.auth_policy()`; tenant scoping is checked here.
Errors become a status code with a one-line message, never a stack trace.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra import auth
from infra.db import Connection
from infra.grpc_server import ErrorStatus, map_errors
from infra.log import get_logger
from infra.page_tokens import PageTokens, page_size
from services.seller_admin import audit, convert, store
from services.seller_admin.access import scoped_tenant
from services.seller_admin.audit_trail import AuditTrail
from services.seller_admin.domain import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SellerAddress,
    mask_address,
    new_tenant_id,
    parse_channel_address,
    parse_seller_address,
    sender_candidates,
    validate_account_sid,
    validate_alphanumeric_sender_id,
    validate_display_name,
    validate_tenant_id,
)

_log = get_logger(__name__)

# Tenants by id (one list for the whole platform: scope ""), a tenant's channels by
# (created_at, channel_id), its seller phones by address.
TENANT_PAGES = PageTokens("seller_admin.tenants", (str,))
CHANNEL_PAGES = PageTokens("seller_admin.channels", (datetime, uuid.UUID))
SELLER_PHONE_PAGES = PageTokens("seller_admin.seller_phones", (str,))
# Keyset start for channels, ordered by (created_at, channel_id): before any row.
CHANNELS_START = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))

# This service's errors -> status codes (the common ones: infra.grpc_server).
ERROR_STATUS: ErrorStatus = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    auth.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
}
rpc = map_errors(ERROR_STATUS)


def _instant(value: Timestamp, name: str) -> datetime:
    try:
        return value.ToDatetime(tzinfo=UTC)
    except ValueError:  # seconds or nanos outside what a Timestamp may hold
        raise InvalidArgumentError(f"{name} is not a valid timestamp") from None


def _log_change(event: str, **fields: str) -> None:
    _log.info(event, extra={"fields": fields})


class SellerAdminApi(seller_admin_pb2_grpc.SellerAdminServiceServicer):
    def __init__(self, pool: asyncpg.Pool, audit_trail: AuditTrail) -> None:
        self._pool = pool
        self._audit_trail = audit_trail

    # --- Tenants ------------------------------------------------------------------------------

    @rpc
    async def CreateTenant(
        self,
        request: pb.CreateTenantRequest,
        context: grpc.aio.ServicerContext[pb.CreateTenantRequest, pb.CreateTenantResponse],
    ) -> pb.CreateTenantResponse:
        actor = auth.current_principal()
        requested_id = request.tenant_id.strip()
        tenant_id = validate_tenant_id(requested_id) if requested_id else new_tenant_id()
        display_name = validate_display_name(request.display_name)
        async with self._pool.acquire() as conn, conn.transaction():
            tenant, created = await store.add_tenant(conn, tenant_id, display_name)
            if created:
                await audit.tenant_created(conn, actor, tenant)
            elif tenant.display_name != display_name:
                raise AlreadyExistsError(
                    f"tenant {tenant_id} already exists with another display_name"
                )
        if created:
            _log_change("tenant.created", tenant_id=tenant_id, actor=actor.sub)
        return pb.CreateTenantResponse(tenant=convert.tenant(tenant), created=created)

    @rpc
    async def GetTenant(
        self,
        request: pb.GetTenantRequest,
        context: grpc.aio.ServicerContext[pb.GetTenantRequest, pb.GetTenantResponse],
    ) -> pb.GetTenantResponse:
        tenant_id = validate_tenant_id(request.tenant_id)
        async with self._pool.acquire() as conn:
            tenant = await store.get_tenant(conn, tenant_id)
        if tenant is None:
            raise NotFoundError(f"tenant {tenant_id} does not exist")
        return pb.GetTenantResponse(tenant=convert.tenant(tenant))

    @rpc
    async def ListTenants(
        self,
        request: pb.ListTenantsRequest,
        context: grpc.aio.ServicerContext[pb.ListTenantsRequest, pb.ListTenantsResponse],
    ) -> pb.ListTenantsResponse:
        size = page_size(request.page_size)
        after = TENANT_PAGES.decode(request.page_token, "")
        async with self._pool.acquire() as conn:
            tenants = await store.list_tenants(
                conn, after=after[0] if after else "", limit=size + 1
            )
        next_token = ""
        if len(tenants) > size:
            next_token = TENANT_PAGES.encode("", tenants[size - 1].tenant_id)
        return pb.ListTenantsResponse(
            tenants=[convert.tenant(t) for t in tenants[:size]], next_page_token=next_token
        )

    # --- Channels -----------------------------------------------------------------------------

    @rpc
    async def AddChannel(
        self,
        request: pb.AddChannelRequest,
        context: grpc.aio.ServicerContext[pb.AddChannelRequest, pb.AddChannelResponse],
    ) -> pb.AddChannelResponse:
        actor = auth.current_principal()
        tenant_id = scoped_tenant(actor.role, actor.tenant_id, request.tenant_id)
        address = parse_channel_address(request.address)
        account_sid = validate_account_sid(request.account_sid)
        alphanumeric = validate_alphanumeric_sender_id(request.alphanumeric_sender_id, address.kind)
        async with self._pool.acquire() as conn, conn.transaction():
            channel, created = await store.add_channel(
                conn, tenant_id, address, account_sid, alphanumeric
            )
            if created:
                await audit.channel_changed(conn, actor, channel, added=True)
            elif channel.tenant_id != tenant_id:
                raise AlreadyExistsError(f"{address.canonical} belongs to another tenant")
            elif channel.account_sid != account_sid:
                raise AlreadyExistsError(
                    f"{address.canonical} is registered with account {channel.account_sid}"
                )
            elif channel.alphanumeric_sender_id != alphanumeric:
                raise AlreadyExistsError(
                    f"{address.canonical} is registered with alphanumeric sender ID"
                    f" {channel.alphanumeric_sender_id or '(none)'}"
                )
        if created:
            _log_change(
                "channel.added", tenant_id=tenant_id, address=address.canonical, actor=actor.sub
            )
        return pb.AddChannelResponse(channel=convert.channel(channel), created=created)

    @rpc
    async def RemoveChannel(
        self,
        request: pb.RemoveChannelRequest,
        context: grpc.aio.ServicerContext[pb.RemoveChannelRequest, pb.RemoveChannelResponse],
    ) -> pb.RemoveChannelResponse:
        actor = auth.current_principal()
        tenant_id = scoped_tenant(actor.role, actor.tenant_id, request.tenant_id)
        address = parse_channel_address(request.address)
        async with self._pool.acquire() as conn, conn.transaction():
            channel = await store.remove_channel(conn, tenant_id, address)
            if channel is None:
                raise NotFoundError(f"tenant {tenant_id} has no channel {address.canonical}")
            await audit.channel_changed(conn, actor, channel, added=False)
        _log_change(
            "channel.removed", tenant_id=tenant_id, address=address.canonical, actor=actor.sub
        )
        return pb.RemoveChannelResponse(channel=convert.channel(channel))

    @rpc
    async def ListChannels(
        self,
        request: pb.ListChannelsRequest,
        context: grpc.aio.ServicerContext[pb.ListChannelsRequest, pb.ListChannelsResponse],
    ) -> pb.ListChannelsResponse:
        actor = auth.current_principal()
        tenant_id = scoped_tenant(actor.role, actor.tenant_id, request.tenant_id)
        size = page_size(request.page_size)
        after = CHANNEL_PAGES.decode(request.page_token, tenant_id) or CHANNELS_START
        async with self._pool.acquire() as conn:
            channels = await store.list_channels(conn, tenant_id, after=after, limit=size + 1)
            if not channels and not request.page_token:
                await _require_tenant(conn, tenant_id)
        next_token = ""
        if len(channels) > size:
            last = channels[size - 1]
            next_token = CHANNEL_PAGES.encode(tenant_id, last.created_at, last.channel_id)
        return pb.ListChannelsResponse(
            channels=[convert.channel(c) for c in channels[:size]], next_page_token=next_token
        )

    # --- Seller phones ------------------------------------------------------------------------

    @rpc
    async def AddSellerPhone(
        self,
        request: pb.AddSellerPhoneRequest,
        context: grpc.aio.ServicerContext[pb.AddSellerPhoneRequest, pb.AddSellerPhoneResponse],
    ) -> pb.AddSellerPhoneResponse:
        actor = auth.current_principal()
        tenant_id = scoped_tenant(actor.role, actor.tenant_id, request.tenant_id)
        address = _seller_address(request)
        async with self._pool.acquire() as conn, conn.transaction():
            phone, created = await store.add_seller_phone(conn, tenant_id, address)
            if created:
                await audit.seller_phone_changed(conn, actor, phone, added=True)
        if created:
            _log_change(
                "seller_phone.added",
                tenant_id=tenant_id,
                address=mask_address(address.value),
                actor=actor.sub,
            )
        return pb.AddSellerPhoneResponse(seller_phone=convert.seller_phone(phone), created=created)

    @rpc
    async def RemoveSellerPhone(
        self,
        request: pb.RemoveSellerPhoneRequest,
        context: grpc.aio.ServicerContext[
            pb.RemoveSellerPhoneRequest, pb.RemoveSellerPhoneResponse
        ],
    ) -> pb.RemoveSellerPhoneResponse:
        actor = auth.current_principal()
        tenant_id = scoped_tenant(actor.role, actor.tenant_id, request.tenant_id)
        address = _seller_address(request)
        async with self._pool.acquire() as conn, conn.transaction():
            phone = await store.remove_seller_phone(conn, tenant_id, address)
            if phone is None:
                raise NotFoundError(f"{address.value} is not a seller of tenant {tenant_id}")
            await audit.seller_phone_changed(conn, actor, phone, added=False)
        _log_change(
            "seller_phone.removed",
            tenant_id=tenant_id,
            address=mask_address(address.value),
            actor=actor.sub,
        )
        return pb.RemoveSellerPhoneResponse(seller_phone=convert.seller_phone(phone))

    @rpc
    async def ListSellerPhones(
        self,
        request: pb.ListSellerPhonesRequest,
        context: grpc.aio.ServicerContext[pb.ListSellerPhonesRequest, pb.ListSellerPhonesResponse],
    ) -> pb.ListSellerPhonesResponse:
        actor = auth.current_principal()
        tenant_id = scoped_tenant(actor.role, actor.tenant_id, request.tenant_id)
        size = page_size(request.page_size)
        after = SELLER_PHONE_PAGES.decode(request.page_token, tenant_id)
        async with self._pool.acquire() as conn:
            phones = await store.list_seller_phones(
                conn, tenant_id, after=after[0] if after else "", limit=size + 1
            )
            if not phones and after is None:
                await _require_tenant(conn, tenant_id)
        next_token = ""
        if len(phones) > size:
            next_token = SELLER_PHONE_PAGES.encode(tenant_id, phones[size - 1].address.value)
        return pb.ListSellerPhonesResponse(
            seller_phones=[convert.seller_phone(p) for p in phones[:size]],
            next_page_token=next_token,
        )

    # --- Audit trail --------------------------------------------------------------------------

    @rpc
    async def ListAuditRecords(
        self,
        request: pb.ListAuditRecordsRequest,
        context: grpc.aio.ServicerContext[pb.ListAuditRecordsRequest, pb.ListAuditRecordsResponse],
    ) -> pb.ListAuditRecordsResponse:
        actor = auth.current_principal()
        tenant_id = scoped_tenant(actor.role, actor.tenant_id, request.tenant_id)
        if not request.HasField("since"):
            raise InvalidArgumentError("since is required")
        since = _instant(request.since, "since")
        until = _instant(request.until, "until") if request.HasField("until") else datetime.now(UTC)
        if until < since:
            raise InvalidArgumentError("until is before since")
        page = await self._audit_trail.records(tenant_id, since, until)
        return pb.ListAuditRecordsResponse(
            records=[convert.audit_record(record) for record in page.records],
            truncated=page.truncated,
        )

    # --- Routing ------------------------------------------------------------------------------

    @rpc
    async def ResolveSender(
        self,
        request: pb.ResolveSenderRequest,
        context: grpc.aio.ServicerContext[pb.ResolveSenderRequest, pb.ResolveSenderResponse],
    ) -> pb.ResolveSenderResponse:
        # The hot path of every inbound message: no transaction, one query.
        recipient = request.recipient
        prefix = convert.ADDRESS_PREFIXES.get(recipient.channel)
        if prefix is None or not recipient.value:
            raise InvalidArgumentError("recipient needs a channel and a value")
        if not request.account_sid:
            raise InvalidArgumentError("account_sid is required")
        candidates = sender_candidates(request.sender.value, request.sender_whatsapp_user_id)
        if not candidates:
            raise InvalidArgumentError("sender is required")
        resolved = await store.resolve_sender(
            self._pool,
            messaging_service_sid=request.messaging_service_sid,
            recipient=prefix + recipient.value,
            account_sid=request.account_sid,
            sender_candidates=candidates,
        )
        if resolved is None:
            raise NotFoundError(
                f"no tenant receives on {prefix}{recipient.value} (account {request.account_sid})"
            )
        return pb.ResolveSenderResponse(
            tenant_id=resolved.tenant_id,
            sender_role=convert.SENDER_ROLES[resolved.role],
            channel_id=str(resolved.channel_id),
        )


def _seller_address(
    request: pb.AddSellerPhoneRequest | pb.RemoveSellerPhoneRequest,
) -> SellerAddress:
    which = request.WhichOneof("seller")
    return parse_seller_address(
        phone_number=request.phone_number if which == "phone_number" else None,
        whatsapp_user_id=request.whatsapp_user_id if which == "whatsapp_user_id" else None,
    )


async def _require_tenant(conn: Connection, tenant_id: str) -> None:
    """An empty list of an unknown tenant is NOT_FOUND, not an empty page."""
    if not await store.tenant_exists(conn, tenant_id):
        raise NotFoundError(f"tenant {tenant_id} does not exist")
