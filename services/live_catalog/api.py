"""The gRPC servicer: translate requests, check the tenant scope, call the store, and map
errors to status codes with a one-line message (never a stack trace)."""

from __future__ import annotations

import uuid
from datetime import datetime

import grpc
from snapsell.live_catalog.v1 import live_catalog_pb2 as pb
from snapsell.live_catalog.v1 import live_catalog_pb2_grpc

from infra.auth import Access, PermissionDeniedError, current_principal, tenant_scope
from infra.grpc_server import ErrorStatus, map_errors
from infra.page_tokens import PageTokens, page_size
from services.live_catalog import domain
from services.live_catalog.events import item_message, reservation_message, summary_message
from services.live_catalog.store import CatalogStore

SERVICE_FULL_NAME = pb.DESCRIPTOR.services_by_name["LiveCatalogService"].full_name

_WRITERS = Access(roles=frozenset({"owner", "manager", "admin"}))
_READERS = Access(roles=frozenset({"owner", "manager", "staff", "admin"}))
# Keyed by full method name, as `infra.auth.AuthInterceptor` wants it. No service calls the
# catalog today (it hears routing and live_session through their events); name one in
# `services=` when it does.
ACCESS_POLICY: dict[str, Access] = {
    f"/{SERVICE_FULL_NAME}/{method}": access
    for method, access in {
        "PostItem": _WRITERS,
        "UpdateItem": _WRITERS,
        "CloseItem": _WRITERS,
        "CancelReservation": _WRITERS,
        "ConfirmReservation": _WRITERS,
        "GetItem": _READERS,
        "ListItems": _READERS,
        "ListReservations": _READERS,
        "GetSessionSummary": _READERS,
    }.items()
}

# Sorted on (received_at, id); a token is valid for the tenant it lists.
RESERVATION_PAGES = PageTokens("live_catalog.reservations", (datetime, uuid.UUID))

# This service's errors -> status codes (the common ones: infra.grpc_server); the message of
# each is one line safe for the caller.
ERROR_STATUS: ErrorStatus = {
    domain.InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    domain.NotFoundError: grpc.StatusCode.NOT_FOUND,
    domain.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    domain.PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
}
_rpc = map_errors(ERROR_STATUS)


def _tenant(requested: str) -> str:
    tenant_id = tenant_scope(current_principal(), requested)
    if not tenant_id or len(tenant_id) > 128:
        raise domain.InvalidRequestError("tenant_id must be 1 to 128 characters")
    return tenant_id


def _caller() -> str:
    return f"rpc:{current_principal().sub}"[:256]


class LiveCatalogApi(live_catalog_pb2_grpc.LiveCatalogServiceServicer):
    def __init__(self, store: CatalogStore) -> None:
        self._store = store

    async def _session(self, tenant_id: str, requested: str) -> uuid.UUID:
        if requested:
            return domain.uuid_of("session_id", requested)
        return await self._store.current_session_id(tenant_id)

    @_rpc
    async def PostItem(
        self,
        request: pb.PostItemRequest,
        context: grpc.aio.ServicerContext[pb.PostItemRequest, pb.PostItemResponse],
    ) -> pb.PostItemResponse:
        tenant_id = _tenant(request.tenant_id)
        item = await self._store.post_item(
            tenant_id,
            domain.uuid_of("session_id", request.session_id) if request.session_id else None,
            code=domain.item_code(request.code),
            title=domain.title(request.title),
            price_cents=domain.price_cents(request.price_cents) or None,
            currency=domain.currency(request.currency),
            stock=domain.stock(request.stock),
            max_per_client=(
                domain.max_per_client(request.max_per_client) if request.max_per_client else None
            ),
            correlation=_caller(),
        )
        return pb.PostItemResponse(item=item_message(item))

    @_rpc
    async def UpdateItem(
        self,
        request: pb.UpdateItemRequest,
        context: grpc.aio.ServicerContext[pb.UpdateItemRequest, pb.UpdateItemResponse],
    ) -> pb.UpdateItemResponse:
        tenant_id = _tenant(request.tenant_id)
        has = request.HasField
        item, promoted = await self._store.update_item(
            tenant_id,
            domain.uuid_of("item_id", request.item_id),
            title=domain.title(request.title) if has("title") else None,
            price_cents=domain.price_cents(request.price_cents) if has("price_cents") else None,
            stock=domain.stock(request.stock) if has("stock") else None,
            max_per_client=(
                domain.max_per_client(request.max_per_client) if has("max_per_client") else None
            ),
            correlation=_caller(),
        )
        return pb.UpdateItemResponse(item=item_message(item), promoted=promoted)

    @_rpc
    async def CloseItem(
        self,
        request: pb.CloseItemRequest,
        context: grpc.aio.ServicerContext[pb.CloseItemRequest, pb.CloseItemResponse],
    ) -> pb.CloseItemResponse:
        tenant_id = _tenant(request.tenant_id)
        item, closed_now = await self._store.close_item(
            tenant_id, domain.uuid_of("item_id", request.item_id), _caller()
        )
        return pb.CloseItemResponse(item=item_message(item), closed_now=closed_now)

    @_rpc
    async def GetItem(
        self,
        request: pb.GetItemRequest,
        context: grpc.aio.ServicerContext[pb.GetItemRequest, pb.GetItemResponse],
    ) -> pb.GetItemResponse:
        tenant_id = _tenant(request.tenant_id)
        item = await self._store.get_item(tenant_id, domain.uuid_of("item_id", request.item_id))
        return pb.GetItemResponse(item=item_message(item))

    @_rpc
    async def ListItems(
        self,
        request: pb.ListItemsRequest,
        context: grpc.aio.ServicerContext[pb.ListItemsRequest, pb.ListItemsResponse],
    ) -> pb.ListItemsResponse:
        tenant_id = _tenant(request.tenant_id)
        session_id = await self._session(tenant_id, request.session_id)
        items = await self._store.list_items(tenant_id, session_id)
        return pb.ListItemsResponse(items=[item_message(item) for item in items])

    @_rpc
    async def ListReservations(
        self,
        request: pb.ListReservationsRequest,
        context: grpc.aio.ServicerContext[pb.ListReservationsRequest, pb.ListReservationsResponse],
    ) -> pb.ListReservationsResponse:
        tenant_id = _tenant(request.tenant_id)
        session_id = domain.uuid_of("session_id", request.session_id)
        item_id = domain.uuid_of("item_id", request.item_id) if request.item_id else None
        limit = page_size(request.page_size)
        key = RESERVATION_PAGES.decode(request.page_token, tenant_id)
        after = None if key is None else (key[0], key[1])
        found = await self._store.list_reservations(
            tenant_id,
            session_id,
            item_id,
            limit + 1,
            after,
        )
        token = ""
        if len(found) > limit:
            found = found[:limit]
            token = RESERVATION_PAGES.encode(tenant_id, found[-1].received_at, found[-1].id)
        return pb.ListReservationsResponse(
            reservations=[reservation_message(r) for r in found], next_page_token=token
        )

    @_rpc
    async def CancelReservation(
        self,
        request: pb.CancelReservationRequest,
        context: grpc.aio.ServicerContext[
            pb.CancelReservationRequest, pb.CancelReservationResponse
        ],
    ) -> pb.CancelReservationResponse:
        tenant_id = _tenant(request.tenant_id)
        reservation, promoted = await self._store.cancel_reservation(
            tenant_id, domain.uuid_of("reservation_id", request.reservation_id), _caller()
        )
        return pb.CancelReservationResponse(
            reservation=reservation_message(reservation), promoted=promoted
        )

    @_rpc
    async def ConfirmReservation(
        self,
        request: pb.ConfirmReservationRequest,
        context: grpc.aio.ServicerContext[
            pb.ConfirmReservationRequest, pb.ConfirmReservationResponse
        ],
    ) -> pb.ConfirmReservationResponse:
        tenant_id = _tenant(request.tenant_id)
        reservation = await self._store.confirm_reservation(
            tenant_id, domain.uuid_of("reservation_id", request.reservation_id), _caller()
        )
        return pb.ConfirmReservationResponse(reservation=reservation_message(reservation))

    @_rpc
    async def GetSessionSummary(
        self,
        request: pb.GetSessionSummaryRequest,
        context: grpc.aio.ServicerContext[
            pb.GetSessionSummaryRequest, pb.GetSessionSummaryResponse
        ],
    ) -> pb.GetSessionSummaryResponse:
        tenant_id = _tenant(request.tenant_id)
        totals = await self._store.session_totals(
            tenant_id, domain.uuid_of("session_id", request.session_id)
        )
        return pb.GetSessionSummaryResponse(summary=summary_message(totals, self._store.book.hold))
