"""Routing's gRPC clients over real sockets against small scripted servers of the peers'
contracts: the sender directory, Touch coalescing, the COMPLIANCE Enqueue and error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from snapsell.live_session.v1 import live_session_pb2, live_session_pb2_grpc
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc
from snapsell.seller_admin.v1 import seller_admin_pb2, seller_admin_pb2_grpc

from infra.auth import ServiceTokenProvider
from infra.grpc_client import service_channel
from services.routing.clients import (
    ChannelSenderDirectory,
    ComplianceReply,
    GrpcLiveSessions,
    GrpcReplySender,
    PeerUnavailableError,
    ReplyRejectedError,
    Sender,
    reply_sender_address,
)
from services.routing.domain import LiveSignalKind, SenderRole
from tests.integration.routing.fakes import SELLER, SHOP_NUMBER, inbound
from tools.dev_keys import DevKeys

SELLER_WA_ID = "US.13491208655302741918"  # a second seller, registered by WhatsApp user ID


class SellerAdmin(seller_admin_pb2_grpc.SellerAdminServiceServicer):
    def __init__(self) -> None:
        self.calls = 0  # ResolveSender
        self.pages = 0  # ListSellerPhones
        self.status: grpc.StatusCode | None = None
        self.list_status: grpc.StatusCode | None = None

    async def ListSellerPhones(self, request, context):  # type: ignore[no-untyped-def]
        self.pages += 1
        if self.list_status is not None:
            await context.abort(self.list_status, "scripted failure")
        assert request.tenant_id == "shop-1"
        if not request.page_token:  # two pages, to be read to the end
            phone = seller_admin_pb2.SellerPhone(tenant_id="shop-1", address=SELLER)
            return seller_admin_pb2.ListSellerPhonesResponse(
                seller_phones=[phone], next_page_token="page-2"
            )
        phone = seller_admin_pb2.SellerPhone(tenant_id="shop-1", address=SELLER_WA_ID)
        return seller_admin_pb2.ListSellerPhonesResponse(seller_phones=[phone])

    async def ResolveSender(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.status is not None:
            await context.abort(self.status, "scripted failure")
        if request.recipient.value != SHOP_NUMBER:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown channel")
        seller = request.sender.value == SELLER
        return seller_admin_pb2.ResolveSenderResponse(
            tenant_id="shop-1",
            sender_role=(
                seller_admin_pb2.SENDER_ROLE_SELLER
                if seller
                else seller_admin_pb2.SENDER_ROLE_CLIENT
            ),
        )


class LiveSession(live_session_pb2_grpc.LiveSessionServiceServicer):
    def __init__(self) -> None:
        self.requests: list[live_session_pb2.TouchRequest] = []
        self.release = asyncio.Event()
        self.active = True

    async def Touch(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        await self.release.wait()
        if request.existing_only and not self.active:
            return live_session_pb2.TouchResponse()
        session = live_session_pb2.LiveSession(session_id="s-1", tenant_id=request.tenant_id)
        return live_session_pb2.TouchResponse(session=session, created=len(self.requests) == 1)


class Outbox(outbox_pb2_grpc.OutboxServiceServicer):
    def __init__(self) -> None:
        self.requests: list[outbox_pb2.EnqueueRequest] = []
        self.status: grpc.StatusCode | None = None  # the whole call fails
        self.refused: grpc.StatusCode | None = None  # the second request is refused

    async def EnqueueMany(self, request, context):  # type: ignore[no-untyped-def]
        if self.status is not None:
            await context.abort(self.status, "scripted failure")
        results = []
        for index, one in enumerate(request.requests):
            if index == 1 and self.refused is not None:
                code = self.refused.value[0]
                results.append(outbox_pb2.EnqueueResult(code=code, error="body is too long"))
                continue
            self.requests.append(one)
            results.append(outbox_pb2.EnqueueResult(message_id=f"m-{len(self.requests)}"))
        return outbox_pb2.EnqueueManyResponse(results=results)


class Peers:
    def __init__(self) -> None:
        self.seller_admin, self.live_session, self.outbox = SellerAdmin(), LiveSession(), Outbox()
        self.server = grpc.aio.server()
        seller_admin_pb2_grpc.add_SellerAdminServiceServicer_to_server(
            self.seller_admin, self.server
        )
        live_session_pb2_grpc.add_LiveSessionServiceServicer_to_server(
            self.live_session, self.server
        )
        outbox_pb2_grpc.add_OutboxServiceServicer_to_server(self.outbox, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")


@pytest.fixture
async def peers(token_keys: DevKeys) -> AsyncIterator[tuple[Peers, grpc.aio.Channel]]:
    peers = Peers()
    await peers.server.start()
    channel = service_channel(
        f"127.0.0.1:{peers.port}",
        token_provider=ServiceTokenProvider(token_keys.key("routing"), "seller_admin"),
    )
    yield peers, channel
    await channel.close()
    await peers.server.stop(0)


async def test_a_channel_is_loaded_once_and_every_sender_on_it_is_decided_locally(peers) -> None:
    fake, channel = peers
    directory = ChannelSenderDirectory(channel, ttl_s=60, deadline_s=2)
    first = await directory.resolve(inbound("A12"))
    assert first is not None and first.tenant_id == "shop-1" and first.role is SenderRole.CLIENT
    assert (fake.seller_admin.calls, fake.seller_admin.pages) == (1, 2)
    # Other clients, a seller by number, a seller by WhatsApp user ID: no call at all.
    other = await directory.resolve(inbound("A12", sender="+33699999999"))
    seller = await directory.resolve(inbound("Robe", sender=SELLER))
    by_wa_id = inbound("Robe", sender="+33688888888")
    by_wa_id.wa_id = SELLER_WA_ID
    assert other == Sender("shop-1", SenderRole.CLIENT)
    assert seller == Sender("shop-1", SenderRole.SELLER)
    assert await directory.resolve(by_wa_id) == Sender("shop-1", SenderRole.SELLER)
    assert (fake.seller_admin.calls, fake.seller_admin.pages) == (1, 2)
    directory.invalidate()  # a seller_admin event
    await directory.resolve(inbound("A12"))
    assert (fake.seller_admin.calls, fake.seller_admin.pages) == (2, 4)


async def test_a_digits_wa_id_is_the_sellers_number_without_its_plus(peers) -> None:
    _, channel = peers
    directory = ChannelSenderDirectory(channel, ttl_s=60, deadline_s=2)
    message = inbound("Robe", sender="whatsapp-user")
    message.wa_id = SELLER.removeprefix("+")
    assert (await directory.resolve(message)).role is SenderRole.SELLER  # type: ignore[union-attr]


async def test_concurrent_misses_of_one_channel_load_it_once(peers) -> None:
    fake, channel = peers
    directory = ChannelSenderDirectory(channel, ttl_s=60, deadline_s=2)
    found = await asyncio.gather(
        *(directory.resolve(inbound("A12", sender=f"+3361000{n:04d}")) for n in range(20))
    )
    assert {sender.tenant_id for sender in found if sender} == {"shop-1"}
    assert fake.seller_admin.calls == 1


async def test_cached_channels_expire_after_the_ttl(peers) -> None:
    fake, channel = peers
    now = [0.0]
    directory = ChannelSenderDirectory(channel, ttl_s=5, deadline_s=2, clock=lambda: now[0])
    seller = inbound("Robe", sender=SELLER)
    assert (await directory.resolve(seller)).role is SenderRole.SELLER  # type: ignore[union-attr]
    now[0] = 6.0
    await directory.resolve(seller)
    assert fake.seller_admin.calls == 2


async def test_an_unknown_channel_is_none_and_not_cached(peers) -> None:
    fake, channel = peers
    directory = ChannelSenderDirectory(channel, ttl_s=60, deadline_s=2)
    message = inbound("A12", to="+15550000000")
    assert await directory.resolve(message) is None
    assert await directory.resolve(message) is None
    assert fake.seller_admin.calls == 2


@pytest.mark.parametrize("status", [grpc.StatusCode.INTERNAL, grpc.StatusCode.PERMISSION_DENIED])
async def test_other_resolve_failures_are_worth_retrying(peers, status) -> None:
    fake, channel = peers
    fake.seller_admin.status = status
    with pytest.raises(PeerUnavailableError, match=status.name):
        await ChannelSenderDirectory(channel, ttl_s=60, deadline_s=2).resolve(inbound("A12"))
    fake.seller_admin.status = None
    fake.seller_admin.list_status = status
    directory = ChannelSenderDirectory(channel, ttl_s=60, deadline_s=2)
    with pytest.raises(PeerUnavailableError, match="ListSellerPhones"):
        await directory.resolve(inbound("A12"))
    fake.seller_admin.list_status = None  # nothing half-loaded was kept
    assert await directory.resolve(inbound("A12")) == Sender("shop-1", SenderRole.CLIENT)


async def test_a_peer_that_is_not_listening_is_unavailable(token_keys: DevKeys) -> None:
    channel = service_channel(
        "127.0.0.1:9",
        token_provider=ServiceTokenProvider(token_keys.key("routing"), "seller_admin"),
    )
    try:
        with pytest.raises(PeerUnavailableError):
            await ChannelSenderDirectory(channel, ttl_s=60, deadline_s=1).resolve(inbound("A12"))
    finally:
        await channel.close()


async def test_concurrent_touches_of_one_tenant_share_one_call(peers) -> None:
    fake, channel = peers
    sessions = GrpcLiveSessions(channel, deadline_s=2)
    calls = [
        asyncio.create_task(sessions.touch("shop-1", LiveSignalKind.ITEM_CODE, f"SM{i}"))
        for i in range(10)
    ]
    await asyncio.sleep(0.2)
    fake.live_session.release.set()
    touched = await asyncio.gather(*calls)
    assert len(fake.live_session.requests) == 1
    assert {t.session_id for t in touched} == {"s-1"}
    assert [t.created for t in touched].count(True) == 1
    request = fake.live_session.requests[0]
    assert request.signal_kind == live_session_pb2.SIGNAL_KIND_CLIENT_ITEM_CODE
    assert request.existing_only
    await sessions.touch("shop-1", LiveSignalKind.SELLER_MESSAGE, "SM-next")
    assert len(fake.live_session.requests) == 2  # a later signal makes its own call
    assert not fake.live_session.requests[1].existing_only


async def test_an_item_code_never_waits_on_a_seller_touch_nor_opens_a_session(peers) -> None:
    fake, channel = peers
    fake.live_session.active = False
    sessions = GrpcLiveSessions(channel, deadline_s=2)
    seller = asyncio.create_task(sessions.touch("shop-1", LiveSignalKind.SELLER_MESSAGE, "SM1"))
    client = asyncio.create_task(sessions.touch("shop-1", LiveSignalKind.ITEM_CODE, "SM2"))
    await asyncio.sleep(0.2)
    fake.live_session.release.set()
    opened, extended = await asyncio.gather(seller, client)
    # Not coalesced: each made its own call, and only the seller's may open a session.
    assert sorted(r.existing_only for r in fake.live_session.requests) == [False, True]
    assert opened is not None and opened.session_id == "s-1"
    assert extended is None


async def test_the_reply_is_a_compliance_message_keyed_by_the_caller(peers) -> None:
    fake, channel = peers
    message, other = inbound("STOP"), inbound("HELP")
    replies = GrpcReplySender(channel, deadline_s=2)
    answers = await replies.send_compliance_replies(
        [
            ComplianceReply("shop-1", message, "Bye", "SM1:consent"),
            ComplianceReply("shop-1", other, "Help", "SM2:consent"),
        ]
    )
    assert answers == ["m-1", "m-2"]  # one call, each reply's id in order
    request, second = fake.outbox.requests
    assert request.kind == outbox_pb2.MESSAGE_KIND_COMPLIANCE
    assert request.idempotency_key == "SM1:consent"
    assert request.sender == f"whatsapp:{SHOP_NUMBER}"
    assert request.recipient == message.sender
    assert request.correlation_id == message.message_sid
    assert request.body == "Bye"
    assert (second.idempotency_key, second.recipient) == ("SM2:consent", other.sender)


async def test_an_invalid_reply_is_rejected_alone_and_an_outage_is_retryable(peers) -> None:
    fake, channel = peers
    replies = GrpcReplySender(channel, deadline_s=2)
    batch = [ComplianceReply("shop-1", inbound("STOP"), "x", f"k{n}") for n in range(3)]
    # Invalid, or from a sender that is not one of the tenant's channels.
    for refusal in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        fake.outbox.refused = refusal
        first, refused, third = await replies.send_compliance_replies(batch)
        assert isinstance(refused, ReplyRejectedError)
        assert isinstance(first, str) and isinstance(third, str)
    fake.outbox.refused = grpc.StatusCode.PERMISSION_DENIED  # a misconfiguration: retry later
    with pytest.raises(PeerUnavailableError):
        await replies.send_compliance_replies(batch)
    fake.outbox.refused = None
    fake.outbox.status = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(PeerUnavailableError):
        await replies.send_compliance_replies(batch)


def test_replies_go_out_through_the_messaging_service_when_there_is_one() -> None:
    message = inbound("STOP")
    message.messaging_service_sid = "MG" + "0" * 32
    assert reply_sender_address(message) == message.messaging_service_sid
