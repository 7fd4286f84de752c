"""The gRPC servicer: translate requests, check the tenant scope, call the store or the consent
use case, and map errors to status codes with a one-line message (never a stack trace)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import grpc
from snapsell.common.v1 import address_pb2
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc

from infra.auth import (
    Access,
    PermissionDeniedError,
    Principal,
    current_principal,
    tenant_scope,
)
from infra.convert import timestamp
from infra.grpc_server import ErrorStatus, map_errors
from infra.log import get_logger
from infra.page_tokens import PageTokens, page_size
from services.routing import store
from services.routing.consent import (
    CHANNEL_FROM_PROTO,
    CHANNEL_TO_PROTO,
    SOURCE_TO_PROTO,
    apply_consent_change,
)
from services.routing.domain import (
    ConsentChange,
    ConsentLockedError,
    ConsentOutcome,
    ConsentSource,
    ConsentState,
    Contact,
    InvalidAddressError,
    RulesBook,
    normalise_address,
)

SERVICE_FULL_NAME = routing_pb2.DESCRIPTOR.services_by_name["RoutingService"].full_name
# Keyed by full method name, as `infra.auth.AuthInterceptor` wants it. Consent checks are asked
# by the outbox's sender workers before each send.
ACCESS_POLICY: dict[str, Access] = {
    f"/{SERVICE_FULL_NAME}/CheckOptOut": Access(services=frozenset({"outbox"})),
    f"/{SERVICE_FULL_NAME}/CheckOptOuts": Access(services=frozenset({"outbox"})),
    # Who opted out is personal data: staff answer clients, they do not need the list.
    f"/{SERVICE_FULL_NAME}/ListOptOuts": Access(roles=frozenset({"owner", "manager", "admin"})),
    f"/{SERVICE_FULL_NAME}/SetConsent": Access(roles=frozenset({"owner", "manager", "admin"})),
}
# Sorted on (opted_out_at, id), newest first; a token is valid for the tenant it lists.
OPT_OUT_PAGES = PageTokens("routing.opt_outs", (datetime, int))
# CheckOptOuts: a bound on one statement's work and one reply's size (~50 bytes a result).
MAX_CHECKS = 1000

_log = get_logger(__name__)


class InvalidRequestError(ValueError):
    """The request is malformed; the message is returned to the caller."""


# This service's errors -> status codes (the common ones: infra.grpc_server).
ERROR_STATUS: ErrorStatus = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidAddressError: grpc.StatusCode.INVALID_ARGUMENT,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    ConsentLockedError: grpc.StatusCode.FAILED_PRECONDITION,
}
_rpc = map_errors(ERROR_STATUS)


def contact_from_request(tenant_id: str, address: address_pb2.Address) -> Contact:
    channel = CHANNEL_FROM_PROTO.get(address.channel)
    if channel is None:
        raise InvalidRequestError("address.channel is required")
    return Contact(tenant_id, channel, normalise_address(channel, address.value))


def contacts_from_checks(
    principal: Principal, checks: Sequence[routing_pb2.CheckOptOutRequest]
) -> list[Contact]:
    """The contacts of a CheckOptOuts batch; the first bad check is named in the error."""
    if len(checks) > MAX_CHECKS:
        raise InvalidRequestError(f"at most {MAX_CHECKS} checks per call, got {len(checks)}")
    contacts = []
    for index, check in enumerate(checks):
        if not check.tenant_id:
            raise InvalidRequestError(f"checks[{index}]: tenant_id is required")
        tenant_id = tenant_scope(principal, check.tenant_id)
        try:
            contacts.append(contact_from_request(tenant_id, check.address))
        except (InvalidRequestError, InvalidAddressError) as error:
            raise InvalidRequestError(f"checks[{index}]: {error}") from None
    return contacts


def consent_reply(status: store.ConsentStatus) -> routing_pb2.CheckOptOutResponse:
    reply = routing_pb2.CheckOptOutResponse(opted_out=status.opted_out_at is not None)
    if status.opted_out_at is not None:
        reply.opted_out_at.FromDatetime(status.opted_out_at)
    if status.last_inbound_at is not None:
        reply.last_inbound_at.FromDatetime(status.last_inbound_at)
    return reply


class RoutingApi(routing_pb2_grpc.RoutingServiceServicer):
    def __init__(self, pool: asyncpg.Pool, rules: RulesBook) -> None:
        self._pool = pool
        self._rules = rules  # each tenant's consent scope

    @_rpc
    async def CheckOptOut(
        self,
        request: routing_pb2.CheckOptOutRequest,
        context: grpc.aio.ServicerContext[
            routing_pb2.CheckOptOutRequest, routing_pb2.CheckOptOutResponse
        ],
    ) -> routing_pb2.CheckOptOutResponse:
        tenant_id = tenant_scope(current_principal(), request.tenant_id)
        status = await store.consent_status(
            self._pool, contact_from_request(tenant_id, request.address)
        )
        return consent_reply(status)

    @_rpc
    async def CheckOptOuts(
        self,
        request: routing_pb2.CheckOptOutsRequest,
        context: grpc.aio.ServicerContext[
            routing_pb2.CheckOptOutsRequest, routing_pb2.CheckOptOutsResponse
        ],
    ) -> routing_pb2.CheckOptOutsResponse:
        contacts = contacts_from_checks(current_principal(), request.checks)
        statuses = await store.consent_statuses(self._pool, contacts)
        return routing_pb2.CheckOptOutsResponse(results=[consent_reply(s) for s in statuses])

    @_rpc
    async def ListOptOuts(
        self,
        request: routing_pb2.ListOptOutsRequest,
        context: grpc.aio.ServicerContext[
            routing_pb2.ListOptOutsRequest, routing_pb2.ListOptOutsResponse
        ],
    ) -> routing_pb2.ListOptOutsResponse:
        tenant_id = tenant_scope(current_principal(), request.tenant_id)
        limit = page_size(request.page_size)
        after = OPT_OUT_PAGES.decode(request.page_token, tenant_id)
        records = await store.list_opt_outs(self._pool, tenant_id, limit=limit + 1, after=after)
        reply = routing_pb2.ListOptOutsResponse()
        for record in records[:limit]:
            reply.opt_outs.append(
                routing_pb2.OptOut(
                    tenant_id=record.contact.tenant_id,
                    address=address_pb2.Address(
                        channel=CHANNEL_TO_PROTO[record.contact.channel],
                        value=record.contact.address,
                    ),
                    opted_out_at=timestamp(record.opted_out_at),
                    source=SOURCE_TO_PROTO[record.source],
                    message_sid=record.message_sid,
                    keyword=record.keyword,
                    actor=record.actor,
                    reason=record.reason,
                )
            )
        if len(records) > limit:
            last = records[limit - 1]
            reply.next_page_token = OPT_OUT_PAGES.encode(tenant_id, last.opted_out_at, last.id)
        return reply

    @_rpc
    async def SetConsent(
        self,
        request: routing_pb2.SetConsentRequest,
        context: grpc.aio.ServicerContext[
            routing_pb2.SetConsentRequest, routing_pb2.SetConsentResponse
        ],
    ) -> routing_pb2.SetConsentResponse:
        principal = current_principal()
        tenant_id = tenant_scope(principal, request.tenant_id)
        states = {
            routing_pb2.CONSENT_STATE_OPTED_OUT: ConsentState.OPTED_OUT,
            routing_pb2.CONSENT_STATE_OPTED_IN: ConsentState.OPTED_IN,
        }
        state = states.get(request.state)
        if state is None:
            raise InvalidRequestError("state must be CONSENT_STATE_OPTED_OUT or _OPTED_IN")
        if len(request.reason) > 500:
            raise InvalidRequestError("reason is longer than 500 characters")
        change = ConsentChange(
            contact=contact_from_request(tenant_id, request.address),
            state=state,
            effective_at=datetime.now(UTC),
            source=ConsentSource.OPERATOR,
            actor=principal.sub,
            reason=request.reason,
            tenant_scope=self._rules.for_tenant(tenant_id).consent_scope,
        )
        async with self._pool.acquire() as conn, conn.transaction():
            outcome = await apply_consent_change(conn, change)
            since = await store.opted_out_at(conn, change.contact)
        _log.info(
            "routing.consent_set",
            extra={
                "fields": {
                    "tenant_id": tenant_id,
                    "sub": principal.sub,
                    "state": state.value,
                    "outcome": outcome.value,
                }
            },
        )
        reply = routing_pb2.SetConsentResponse(
            changed=outcome is ConsentOutcome.CHANGED, opted_out=since is not None
        )
        if since is not None:
            reply.opted_out_at.FromDatetime(since)
        return reply
