"""The gRPC servicer: translate requests, check the tenant scope, call the stores, and map
errors to status codes with a one-line message (never a stack trace)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc

from infra import telemetry
from infra.auth import Access, PermissionDeniedError, current_principal, tenant_scope
from infra.grpc_server import ErrorStatus, map_errors
from infra.log import get_logger
from infra.page_tokens import PageTokens
from services.outbox import domain, validation
from services.outbox.channels import (
    ChannelDirectory,
    ChannelDirectoryUnavailableError,
    SenderNotAChannelError,
    TenantChannels,
)
from services.outbox.convert import (
    CHANNEL_FROM_PROTO,
    DEAD_REASON_FROM_PROTO,
    KIND_FROM_PROTO,
    message_proto,
)
from services.outbox.domain import InvalidMessageError, NewMessage
from services.outbox.enqueue import CurrentPipeline, enqueue_messages
from services.outbox.store import OutboxAdminStore, OutboxStore

SERVICE_FULL_NAME = outbox_pb2.DESCRIPTOR.services_by_name["OutboxService"].full_name

_TENANT_ROLES = frozenset({"owner", "manager", "staff"})
_OPERATORS = frozenset({"admin", "owner", "manager"})
# Routing enqueues the replies to STOP/START/HELP, live_catalog its answers to claims and the
# end-of-live summaries; no service reads messages back today.
ACCESS_POLICY: dict[str, Access] = {
    f"/{SERVICE_FULL_NAME}/Enqueue": Access(
        roles=_OPERATORS, services=frozenset({"routing", "live_catalog"})
    ),
    f"/{SERVICE_FULL_NAME}/EnqueueMany": Access(
        roles=_OPERATORS, services=frozenset({"routing", "live_catalog"})
    ),
    f"/{SERVICE_FULL_NAME}/GetMessage": Access(roles=_TENANT_ROLES | {"admin"}),
    f"/{SERVICE_FULL_NAME}/ListDeadLetters": Access(roles=_OPERATORS),
    f"/{SERVICE_FULL_NAME}/Redrive": Access(roles=_OPERATORS),
    f"/{SERVICE_FULL_NAME}/Discard": Access(roles=_OPERATORS),
}
# The one service that may enqueue COMPLIANCE messages: routing, which answers STOP/START/HELP.
COMPLIANCE_SENDER = "routing"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_IDS_PER_CALL = 500
MAX_ENQUEUES_PER_CALL = 500
# Sorted on (dead_at, id); a token is valid for the tenant it lists.
DEAD_LETTER_PAGES = PageTokens("outbox.dead_letters", (datetime, uuid.UUID))

_log = get_logger(__name__)


class MessageNotFoundError(Exception):
    """No such message for this tenant."""


# This service's errors -> status codes (the common ones: infra.grpc_server).
ERROR_STATUS: ErrorStatus = {
    InvalidMessageError: grpc.StatusCode.INVALID_ARGUMENT,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    SenderNotAChannelError: grpc.StatusCode.FAILED_PRECONDITION,
    ChannelDirectoryUnavailableError: grpc.StatusCode.UNAVAILABLE,
    MessageNotFoundError: grpc.StatusCode.NOT_FOUND,
}
_rpc = map_errors(ERROR_STATUS)
# What one request of an EnqueueMany may be refused for alone (the others are still stored),
# answered with its code in ERROR_STATUS.
_REFUSALS = (InvalidMessageError, PermissionDeniedError, SenderNotAChannelError)


def _scoped_tenant(requested: str) -> str:
    return tenant_scope(current_principal(), requested)


def _message_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise InvalidMessageError(f'message_id "{text[:64]}" is not a UUID') from None


def _message_ids(texts: Iterable[str]) -> list[uuid.UUID]:
    ids = [_message_id(text) for text in texts]
    if not ids:
        raise InvalidMessageError("message_ids is empty")
    if len(ids) > MAX_IDS_PER_CALL:
        raise InvalidMessageError(f"at most {MAX_IDS_PER_CALL} message_ids per call")
    return ids


def _current_traceparent() -> str | None:
    if not telemetry.tracing_enabled() or not trace.get_current_span().is_recording():
        return None
    carrier: dict[str, str] = {}
    telemetry.inject(carrier)
    return carrier.get("traceparent")


def _timestamp(value: Timestamp, name: str) -> datetime:
    try:
        return value.ToDatetime(tzinfo=UTC)
    except ValueError:  # seconds or nanos outside what a Timestamp may hold
        raise InvalidMessageError(f"{name} is not a valid timestamp") from None


class OutboxApi(outbox_pb2_grpc.OutboxServiceServicer):
    def __init__(
        self,
        store: OutboxStore,
        admin: OutboxAdminStore,
        channels: ChannelDirectory,
        *,
        account_sids: frozenset[str],
        max_attempts: int,
        pipeline: CurrentPipeline | None = None,
    ) -> None:
        """`pipeline`: the sending pipeline of this process, for direct dispatch
        (`enqueue.py`); None: every message is claimed from the table."""
        self._store = store
        self._pipeline = pipeline
        self._admin = admin
        self._channels = channels
        self._account_sids = account_sids
        self._max_attempts = max_attempts

    @_rpc
    async def Enqueue(
        self,
        request: outbox_pb2.EnqueueRequest,
        context: grpc.aio.ServicerContext[outbox_pb2.EnqueueRequest, outbox_pb2.EnqueueResponse],
    ) -> outbox_pb2.EnqueueResponse:
        message = await self._checked_message(request)
        [(message_id, created)] = await self._enqueue([message])
        return outbox_pb2.EnqueueResponse(message_id=str(message_id), created=created)

    @_rpc
    async def EnqueueMany(
        self,
        request: outbox_pb2.EnqueueManyRequest,
        context: grpc.aio.ServicerContext[
            outbox_pb2.EnqueueManyRequest, outbox_pb2.EnqueueManyResponse
        ],
    ) -> outbox_pb2.EnqueueManyResponse:
        if len(request.requests) > MAX_ENQUEUES_PER_CALL:
            raise InvalidMessageError(f"at most {MAX_ENQUEUES_PER_CALL} requests per call")
        results = [outbox_pb2.EnqueueResult() for _ in request.requests]
        accepted: list[tuple[outbox_pb2.EnqueueResult, NewMessage]] = []
        for one, result in zip(request.requests, results, strict=True):
            try:
                accepted.append((result, await self._checked_message(one)))
            except _REFUSALS as error:
                code = next(ERROR_STATUS[kind] for kind in _REFUSALS if isinstance(error, kind))
                assert isinstance(code, grpc.StatusCode)
                result.code, result.error = code.value[0], str(error)
        stored = await self._enqueue([message for _, message in accepted])
        for (result, _), (message_id, created) in zip(accepted, stored, strict=True):
            result.message_id, result.created = str(message_id), created
        return outbox_pb2.EnqueueManyResponse(results=results)

    async def _enqueue(self, messages: list[NewMessage]) -> list[tuple[uuid.UUID, bool]]:
        pipeline = self._pipeline() if self._pipeline is not None else None
        return await enqueue_messages(self._store, messages, pipeline, datetime.now(UTC))

    async def _checked_message(self, request: outbox_pb2.EnqueueRequest) -> NewMessage:
        """The message to store for one Enqueue request, after every check."""
        principal = current_principal()
        tenant_id = _scoped_tenant(request.tenant_id)
        if request.kind == outbox_pb2.MESSAGE_KIND_COMPLIANCE and (
            principal.role != "service" or principal.sub != COMPLIANCE_SENDER
        ):
            # The one kind that reaches opted-out people: only routing's consent replies.
            raise PermissionDeniedError("only routing may enqueue COMPLIANCE messages")
        channels = await self._channels.channels_for(tenant_id, request.sender)
        return self._new_message(tenant_id, request, channels)

    def _new_message(
        self, tenant_id: str, request: outbox_pb2.EnqueueRequest, channels: TenantChannels
    ) -> NewMessage:
        validation.validate_key("idempotency_key", request.idempotency_key, required=True)
        validation.validate_key("correlation_id", request.correlation_id, required=False)
        channel = CHANNEL_FROM_PROTO.get(request.recipient.channel)
        if channel is None:
            raise InvalidMessageError("recipient.channel must be SMS, WHATSAPP or MESSENGER")
        validation.validate_recipient(channel, request.recipient.value)
        validation.validate_sender(request.sender, channel)
        content = request.WhichOneof("content")
        body = request.body if content == "body" else None
        template = request.template if content == "template" else None
        variables = dict(template.variables) if template is not None else {}
        content_sid = template.content_sid if template is not None else None
        validation.validate_content(body, content_sid, variables)
        kind = KIND_FROM_PROTO.get(request.kind, domain.MessageKind.CONVERSATIONAL)
        if request.kind not in KIND_FROM_PROTO and request.kind != 0:
            raise InvalidMessageError(f"unknown kind {request.kind}")
        if request.account_sid:
            validation.validate_account_sid(request.account_sid, self._account_sids)
        # The sender must be the tenant's, and is sent with its channel's account.
        account_sid = channels.account_for(request.sender, request.account_sid)
        validation.validate_account_sid(account_sid, self._account_sids)
        now = datetime.now(UTC)
        not_before = None
        if request.HasField("not_before"):
            not_before = _timestamp(request.not_before, "not_before")
            validation.validate_not_before(not_before, now)
        return NewMessage(
            tenant_id=tenant_id,
            idempotency_key=request.idempotency_key,
            correlation_id=request.correlation_id,
            kind=kind,
            account_sid=account_sid,
            sender=request.sender,
            recipient_channel=channel,
            recipient=request.recipient.value,
            body=body,
            content_sid=content_sid,
            content_variables=json.dumps(variables, sort_keys=True) if variables else None,
            not_before=not_before,
            max_attempts=self._max_attempts,
            traceparent=_current_traceparent(),
        )

    @_rpc
    async def GetMessage(
        self,
        request: outbox_pb2.GetMessageRequest,
        context: grpc.aio.ServicerContext[
            outbox_pb2.GetMessageRequest, outbox_pb2.GetMessageResponse
        ],
    ) -> outbox_pb2.GetMessageResponse:
        tenant_id = _scoped_tenant(request.tenant_id)
        message_id = _message_id(request.message_id)
        found = await self._admin.get_message(tenant_id, message_id)
        if found is None:
            raise MessageNotFoundError(f"tenant {tenant_id!r} has no message {message_id}")
        row, attempts = found
        return outbox_pb2.GetMessageResponse(message=message_proto(row, attempts))

    @_rpc
    async def ListDeadLetters(
        self,
        request: outbox_pb2.ListDeadLettersRequest,
        context: grpc.aio.ServicerContext[
            outbox_pb2.ListDeadLettersRequest, outbox_pb2.ListDeadLettersResponse
        ],
    ) -> outbox_pb2.ListDeadLettersResponse:
        tenant_id = _scoped_tenant(request.tenant_id)
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidMessageError(f"page_size must be between 0 and {MAX_PAGE_SIZE}")
        limit = request.page_size or DEFAULT_PAGE_SIZE
        reason = None
        if request.reason:
            reason = DEAD_REASON_FROM_PROTO.get(request.reason)
            if reason is None:
                raise InvalidMessageError(f"unknown reason {request.reason}")
        rows = await self._admin.list_dead_letters(
            tenant_id,
            limit=limit + 1,
            after=DEAD_LETTER_PAGES.decode(request.page_token, tenant_id),
            reason=reason,
            sender=request.sender or None,
            dead_after=(
                _timestamp(request.dead_after, "dead_after")
                if request.HasField("dead_after")
                else None
            ),
        )
        page, more = rows[:limit], len(rows) > limit
        token = ""
        if more:
            token = DEAD_LETTER_PAGES.encode(tenant_id, page[-1]["dead_at"], page[-1]["id"])
        return outbox_pb2.ListDeadLettersResponse(
            messages=[message_proto(row, []) for row in page], next_page_token=token
        )

    @_rpc
    async def Redrive(
        self,
        request: outbox_pb2.RedriveRequest,
        context: grpc.aio.ServicerContext[outbox_pb2.RedriveRequest, outbox_pb2.RedriveResponse],
    ) -> outbox_pb2.RedriveResponse:
        principal = current_principal()
        tenant_id = _scoped_tenant(request.tenant_id)
        ids = _message_ids(request.message_ids)
        moved = await self._admin.redrive(
            tenant_id,
            ids,
            actor=principal.sub,
            max_attempts=self._max_attempts,
            now=datetime.now(UTC),
        )
        _log.info(
            "outbox.redriven",
            extra={"fields": {"tenant_id": tenant_id, "actor": principal.sub, "count": len(moved)}},
        )
        return outbox_pb2.RedriveResponse(
            redriven_message_ids=[str(i) for i in moved],
            skipped_message_ids=[str(i) for i in ids if i not in set(moved)],
        )

    @_rpc
    async def Discard(
        self,
        request: outbox_pb2.DiscardRequest,
        context: grpc.aio.ServicerContext[outbox_pb2.DiscardRequest, outbox_pb2.DiscardResponse],
    ) -> outbox_pb2.DiscardResponse:
        principal = current_principal()
        tenant_id = _scoped_tenant(request.tenant_id)
        ids = _message_ids(request.message_ids)
        validation.validate_key("reason", request.reason, required=False)
        gone = await self._admin.discard(
            tenant_id, ids, actor=principal.sub, reason=request.reason, now=datetime.now(UTC)
        )
        _log.info(
            "outbox.discarded",
            extra={"fields": {"tenant_id": tenant_id, "actor": principal.sub, "count": len(gone)}},
        )
        return outbox_pb2.DiscardResponse(
            discarded_message_ids=[str(i) for i in gone],
            skipped_message_ids=[str(i) for i in ids if i not in set(gone)],
        )
