"""The gRPC servicer: translate requests, check the tenant scope, call the store, and map
errors to status codes with a one-line message (never a stack trace)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Protocol

import grpc
from snapsell.live_session.v1 import live_session_pb2, live_session_pb2_grpc

from infra.auth import Access, PermissionDeniedError, current_principal, tenant_scope
from infra.grpc_server import ErrorStatus, map_errors
from infra.page_tokens import PageTokens, page_size
from services.live_session import domain
from services.live_session.events import (
    SIGNAL_KIND_FROM_PROTO,
    STATUS_FROM_PROTO,
    session_message,
)
from services.live_session.store import SessionStore, TouchResult

SERVICE_FULL_NAME = live_session_pb2.DESCRIPTOR.services_by_name["LiveSessionService"].full_name

_TENANT_ROLES = frozenset({"owner", "manager", "staff"})
# Keyed by full method name, as `infra.auth.AuthInterceptor` wants it.
# Routing touches a tenant's session on every live signal (a client's item code only extends
# an active one); no service closes one today.
ACCESS_POLICY: dict[str, Access] = {
    f"/{SERVICE_FULL_NAME}/Touch": Access(services=frozenset({"routing"})),
    f"/{SERVICE_FULL_NAME}/GetCurrentSession": Access(roles=_TENANT_ROLES | {"admin"}),
    f"/{SERVICE_FULL_NAME}/ListSessions": Access(roles=_TENANT_ROLES | {"admin"}),
    f"/{SERVICE_FULL_NAME}/CloseSession": Access(roles=frozenset({"owner", "manager", "admin"})),
}

# Sorted on (started_at, id), newest first; a token is valid for the tenant it lists.
SESSION_PAGES = PageTokens("live_session.sessions", (datetime, uuid.UUID))


class SessionNotFoundError(Exception):
    """No such session for this tenant."""


# This service's errors -> status codes (the common ones: infra.grpc_server).
ERROR_STATUS: ErrorStatus = {
    domain.InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    SessionNotFoundError: grpc.StatusCode.NOT_FOUND,
}
_rpc = map_errors(ERROR_STATUS)


def _scoped_tenant(requested: str) -> str:
    return domain.tenant_id(tenant_scope(current_principal(), requested))


class Toucher(Protocol):
    """`SessionStore` itself, or a `TouchBatcher` in front of it."""

    async def touch(
        self, tenant_id: str, signal_kind: domain.SignalKind, correlation_id: str
    ) -> TouchResult: ...

    async def extend(self, tenant_id: str) -> domain.LiveSession | None: ...


class LiveSessionApi(live_session_pb2_grpc.LiveSessionServiceServicer):
    def __init__(self, store: SessionStore, toucher: Toucher) -> None:
        self._store = store
        self._toucher = toucher

    @_rpc
    async def Touch(
        self,
        request: live_session_pb2.TouchRequest,
        context: grpc.aio.ServicerContext[
            live_session_pb2.TouchRequest, live_session_pb2.TouchResponse
        ],
    ) -> live_session_pb2.TouchResponse:
        tenant_id = domain.tenant_id(request.tenant_id)
        signal_kind = SIGNAL_KIND_FROM_PROTO.get(request.signal_kind)
        if signal_kind is None:
            raise domain.InvalidRequestError(
                "signal_kind must be SIGNAL_KIND_SELLER_MESSAGE or SIGNAL_KIND_CLIENT_ITEM_CODE"
            )
        correlation_id = domain.correlation_id(request.correlation_id)
        if request.existing_only:
            session = await self._toucher.extend(tenant_id)
            if session is None:
                return live_session_pb2.TouchResponse()
            return live_session_pb2.TouchResponse(session=session_message(session))
        result = await self._toucher.touch(tenant_id, signal_kind, correlation_id)
        return live_session_pb2.TouchResponse(
            session=session_message(result.session), created=result.created
        )

    @_rpc
    async def GetCurrentSession(
        self,
        request: live_session_pb2.GetCurrentSessionRequest,
        context: grpc.aio.ServicerContext[
            live_session_pb2.GetCurrentSessionRequest, live_session_pb2.GetCurrentSessionResponse
        ],
    ) -> live_session_pb2.GetCurrentSessionResponse:
        tenant_id = _scoped_tenant(request.tenant_id)
        session = await self._store.current(tenant_id)
        if session is None:
            raise SessionNotFoundError(f"tenant {tenant_id!r} has no current live session")
        return live_session_pb2.GetCurrentSessionResponse(session=session_message(session))

    @_rpc
    async def CloseSession(
        self,
        request: live_session_pb2.CloseSessionRequest,
        context: grpc.aio.ServicerContext[
            live_session_pb2.CloseSessionRequest, live_session_pb2.CloseSessionResponse
        ],
    ) -> live_session_pb2.CloseSessionResponse:
        tenant_id = _scoped_tenant(request.tenant_id)
        session_id = domain.session_id(request.session_id)
        correlation_id = domain.correlation_id(request.correlation_id)
        result = await self._store.close(tenant_id, session_id, correlation_id)
        if result is None:
            raise SessionNotFoundError(f"tenant {tenant_id!r} has no session {session_id}")
        return live_session_pb2.CloseSessionResponse(
            session=session_message(result.session), closed_now=result.closed_now
        )

    @_rpc
    async def ListSessions(
        self,
        request: live_session_pb2.ListSessionsRequest,
        context: grpc.aio.ServicerContext[
            live_session_pb2.ListSessionsRequest, live_session_pb2.ListSessionsResponse
        ],
    ) -> live_session_pb2.ListSessionsResponse:
        tenant_id = _scoped_tenant(request.tenant_id)
        status = None
        if request.status != live_session_pb2.SESSION_STATUS_UNSPECIFIED:
            status = STATUS_FROM_PROTO.get(request.status)
            if status is None:
                raise domain.InvalidRequestError(f"unknown status {request.status}")
        limit = page_size(request.page_size)
        key = SESSION_PAGES.decode(request.page_token, tenant_id)
        after = None if key is None else domain.PageCursor(*key)
        page = await self._store.list(tenant_id, status, limit, after)
        token, cursor = "", page.next_cursor
        if cursor is not None:
            token = SESSION_PAGES.encode(tenant_id, cursor.started_at, cursor.session_id)
        return live_session_pb2.ListSessionsResponse(
            sessions=[session_message(s) for s in page.sessions], next_page_token=token
        )
