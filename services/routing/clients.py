"""Routing's calls to other services, behind small Protocols the use case depends on.

- `SenderDirectory`: whether a message comes from a seller or a client of which tenant,
  decided locally from a cache by receiving channel filled from seller_admin (ResolveSender,
  ListSellerPhones), flushed whenever seller_admin publishes an event (a channel or seller
  phone changed) and expired after a short TTL.
- `LiveSessions`: live_session.Touch.
- `ReplySender`: outbox.EnqueueMany of a batch's COMPLIANCE replies, each idempotent on the
  key we derive.

Errors: NOT_FOUND from ResolveSender means "unknown channel" (None). A reply refused with
INVALID_ARGUMENT, or FAILED_PRECONDITION (the reply's sender is not a channel of the tenant,
e.g. a Messaging Service whose numbers were registered one by one), is a `ReplyRejectedError`
for that reply alone (retrying cannot help). Every other failure is
`PeerUnavailableError`: the inbound message is retried later, which is right for a peer that is
down or slow (UNAVAILABLE, DEADLINE_EXCEEDED) and also for a misconfiguration (a wrong secret,
PERMISSION_DENIED) that an operator will fix — nothing is lost meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from prometheus_client import Histogram
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.live_session.v1 import live_session_pb2, live_session_pb2_grpc
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc
from snapsell.seller_admin.v1 import seller_admin_pb2, seller_admin_pb2_grpc

from infra.cache import LoadingCache
from services.routing.domain import LiveSignalKind, SenderRole

PEER_CALL_SECONDS = Histogram(
    "snapsell_routing_peer_call_seconds",
    "Latency of routing's calls to other services, by method and outcome",
    ["method", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


T = TypeVar("T")


class PeerUnavailableError(Exception):
    """A peer call failed in a way worth retrying later; the message is one line."""


class ReplyRejectedError(Exception):
    """The outbox refused the reply as invalid; retrying the same request cannot succeed."""


@dataclass(frozen=True, slots=True)
class Sender:
    tenant_id: str
    role: SenderRole


@dataclass(frozen=True, slots=True)
class Touched:
    session_id: str
    created: bool


class SenderDirectory(Protocol):
    async def resolve(self, message: gateway_events.MessageReceived) -> Sender | None: ...


class LiveSessions(Protocol):
    async def touch(
        self, tenant_id: str, signal: LiveSignalKind, correlation_id: str
    ) -> Touched | None:
        """A seller's message opens a session when none is active; a client's item code only
        extends an active one (None when there is none)."""
        ...


@dataclass(frozen=True, slots=True)
class ComplianceReply:
    tenant_id: str
    inbound: gateway_events.MessageReceived
    body: str
    idempotency_key: str


class ReplySender(Protocol):
    async def send_compliance_replies(
        self, replies: Sequence[ComplianceReply]
    ) -> list[str | ReplyRejectedError]:
        """Each reply's outbox message id, or why the outbox refused that one; raises
        `PeerUnavailableError` when the outbox could not answer for all of them."""
        ...


async def _timed(method: str, call: Awaitable[T]) -> T:
    started = time.perf_counter()
    code = "OK"
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        code = error.code().name
        raise
    finally:
        PEER_CALL_SECONDS.labels(method, code).observe(time.perf_counter() - started)


def _failure(peer: str, error: grpc.aio.AioRpcError) -> PeerUnavailableError:
    return PeerUnavailableError(f"{peer}: {error.code().name}: {error.details() or ''}".strip())


@dataclass(frozen=True, slots=True)
class ChannelSenders:
    """Who writes to one receiving channel: the tenant it belongs to and that tenant's sellers
    (their numbers and WhatsApp user IDs, as seller_admin matches them)."""

    tenant_id: str
    sellers: frozenset[str]

    def role_of(self, message: gateway_events.MessageReceived) -> SenderRole:
        """As seller_admin's ResolveSender decides: the sender's `From` value, or its WaId (a
        WaId of digits is the phone number without its `+`), is one of the sellers'."""
        wa_id = message.wa_id
        candidates = (message.sender.value, f"+{wa_id}" if wa_id.isdigit() else wa_id)
        if any(candidate and candidate in self.sellers for candidate in candidates):
            return SenderRole.SELLER
        return SenderRole.CLIENT


class ChannelSenderDirectory:
    """Who sent an inbound message, decided here from a cache by receiving channel (recipient,
    account, Messaging Service) of its tenant and seller addresses. A channel's entry is loaded
    from seller_admin on a miss (ResolveSender for the tenant, then its ListSellerPhones) and
    kept until `invalidate()` (called on every seller_admin event) or the TTL; unknown
    channels are never kept, so a channel added a second ago routes at once."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        ttl_s: float,
        deadline_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = seller_admin_pb2_grpc.SellerAdminServiceStub(channel)
        self._deadline_s = deadline_s
        self._channels: LoadingCache[tuple[object, ...], ChannelSenders] = LoadingCache(
            ttl_s=ttl_s, clock=clock
        )

    def invalidate(self) -> None:
        self._channels.invalidate_all()

    async def resolve(self, message: gateway_events.MessageReceived) -> Sender | None:
        key = (
            message.recipient.channel,
            message.recipient.value,
            message.account_sid,
            message.messaging_service_sid,
        )
        senders = self._channels.cached(key)
        if senders is None:
            senders = await self._channels.get(key, lambda: self._load(message))
        if senders is None:
            return None
        return Sender(senders.tenant_id, senders.role_of(message))

    async def _load(self, message: gateway_events.MessageReceived) -> ChannelSenders | None:
        request = seller_admin_pb2.ResolveSenderRequest(
            recipient=message.recipient,
            sender=message.sender,
            account_sid=message.account_sid,
            messaging_service_sid=message.messaging_service_sid,
            sender_whatsapp_user_id=message.wa_id,
        )
        try:
            reply = await _timed(
                "ResolveSender", self._stub.ResolveSender(request, timeout=self._deadline_s)
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _failure("seller_admin.ResolveSender", error) from None
        if not reply.tenant_id:
            raise PeerUnavailableError("seller_admin.ResolveSender: incomplete answer")
        sellers: set[str] = set()
        token = ""
        while True:
            page_request = seller_admin_pb2.ListSellerPhonesRequest(
                tenant_id=reply.tenant_id, page_size=_SELLER_PAGE_SIZE, page_token=token
            )
            try:
                page = await _timed(
                    "ListSellerPhones",
                    self._stub.ListSellerPhones(page_request, timeout=self._deadline_s),
                )
            except grpc.aio.AioRpcError as error:
                raise _failure("seller_admin.ListSellerPhones", error) from None
            sellers.update(phone.address for phone in page.seller_phones)
            token = page.next_page_token
            if not token:
                return ChannelSenders(reply.tenant_id, frozenset(sellers))


_SELLER_PAGE_SIZE = 500


_SIGNAL_TO_PROTO = {
    LiveSignalKind.SELLER_MESSAGE: live_session_pb2.SIGNAL_KIND_SELLER_MESSAGE,
    LiveSignalKind.ITEM_CODE: live_session_pb2.SIGNAL_KIND_CLIENT_ITEM_CODE,
}


class GrpcLiveSessions:
    """live_session.Touch, coalesced per tenant: while a Touch for a tenant is in flight, other
    live signals of that tenant wait for its answer instead of queueing behind it on the same
    session row. live_session returns one session to concurrent Touches anyway, and the
    activity time it records is then at most one call's latency older. Only the call that was
    made can report `created`, and live_session's events carry that call's correlation id.
    A client's item code is sent with `existing_only` (it never opens a session) and so is
    coalesced only with other item codes, never with a seller's message that may open one."""

    def __init__(self, channel: grpc.aio.Channel, *, deadline_s: float) -> None:
        self._stub = live_session_pb2_grpc.LiveSessionServiceStub(channel)
        self._deadline_s = deadline_s
        self._in_flight: dict[tuple[str, bool], asyncio.Future[Touched | None]] = {}

    async def touch(
        self, tenant_id: str, signal: LiveSignalKind, correlation_id: str
    ) -> Touched | None:
        key = (tenant_id, signal is LiveSignalKind.ITEM_CODE)
        call = self._in_flight.get(key)
        if call is not None:
            touched = await asyncio.shield(call)
            return None if touched is None else Touched(touched.session_id, created=False)
        call = asyncio.ensure_future(self._touch(tenant_id, signal, correlation_id))
        self._in_flight[key] = call
        call.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(call)

    def _settled(self, key: tuple[str, bool], call: asyncio.Future[Touched | None]) -> None:
        if self._in_flight.get(key) is call:
            del self._in_flight[key]
        if not call.cancelled():
            call.exception()  # retrieved here too, in case every waiter was cancelled

    async def _touch(
        self, tenant_id: str, signal: LiveSignalKind, correlation_id: str
    ) -> Touched | None:
        request = live_session_pb2.TouchRequest(
            tenant_id=tenant_id,
            signal_kind=_SIGNAL_TO_PROTO[signal],
            correlation_id=correlation_id,
            existing_only=signal is LiveSignalKind.ITEM_CODE,
        )
        try:
            reply = await _timed("Touch", self._stub.Touch(request, timeout=self._deadline_s))
        except grpc.aio.AioRpcError as error:
            raise _failure("live_session.Touch", error) from None
        if not reply.HasField("session"):
            return None
        return Touched(reply.session.session_id, reply.created)


_PREFIX = {address_pb2.CHANNEL_WHATSAPP: "whatsapp:", address_pb2.CHANNEL_MESSENGER: "messenger:"}


def reply_sender_address(inbound: gateway_events.MessageReceived) -> str:
    """Twilio `From` for a reply: the Messaging Service the message came through, else the
    business address it was sent to (with its channel prefix)."""
    if inbound.messaging_service_sid:
        return inbound.messaging_service_sid
    return _PREFIX.get(inbound.recipient.channel, "") + inbound.recipient.value


_REJECTED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION})


class GrpcReplySender:
    def __init__(self, channel: grpc.aio.Channel, *, deadline_s: float) -> None:
        self._stub = outbox_pb2_grpc.OutboxServiceStub(channel)
        self._deadline_s = deadline_s

    async def send_compliance_replies(
        self, replies: Sequence[ComplianceReply]
    ) -> list[str | ReplyRejectedError]:
        request = outbox_pb2.EnqueueManyRequest(
            requests=[
                outbox_pb2.EnqueueRequest(
                    tenant_id=reply.tenant_id,
                    sender=reply_sender_address(reply.inbound),
                    recipient=reply.inbound.sender,
                    body=reply.body,
                    kind=outbox_pb2.MESSAGE_KIND_COMPLIANCE,
                    idempotency_key=reply.idempotency_key,
                    correlation_id=reply.inbound.message_sid,
                    account_sid=reply.inbound.account_sid,
                )
                for reply in replies
            ]
        )
        try:
            answer = await _timed(
                "EnqueueMany", self._stub.EnqueueMany(request, timeout=self._deadline_s)
            )
        except grpc.aio.AioRpcError as error:
            raise _failure("outbox.EnqueueMany", error) from None
        if len(answer.results) != len(replies):
            raise PeerUnavailableError("outbox.EnqueueMany: not one result per request")
        outcomes: list[str | ReplyRejectedError] = []
        for result in answer.results:
            code = _CODES.get(result.code, grpc.StatusCode.UNKNOWN)
            if code is grpc.StatusCode.OK:
                outcomes.append(result.message_id)
            elif code in _REJECTED:
                outcomes.append(ReplyRejectedError(f"outbox.EnqueueMany: {result.error}"))
            else:  # e.g. PERMISSION_DENIED: a misconfiguration an operator will fix
                raise PeerUnavailableError(f"outbox.EnqueueMany: {code.name}: {result.error}")
        return outcomes


_CODES = {code.value[0]: code for code in grpc.StatusCode}
