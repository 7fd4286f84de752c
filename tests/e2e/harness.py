"""What an end-to-end test does to the running system, through its public doors only: signed
Twilio webhooks into the gateway, each service's gRPC API with a tenant token, the events each
service publishes on JetStream, and the Twilio sandbox's record of what was sent."""

from __future__ import annotations

import itertools
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import httpx
from google.protobuf.message import Message
from nats.aio.client import Client as NatsClient
from prometheus_client.parser import text_string_to_metric_families
from snapsell.common.v1 import address_pb2
from snapsell.live_session.v1 import live_session_pb2, live_session_pb2_grpc
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc
from snapsell.seller_admin.v1 import seller_admin_pb2, seller_admin_pb2_grpc

from tests.support.polling import eventually
from tests.support.twilio import sign, whatsapp_params
from tools.stack import SystemStack

M = TypeVar("M", bound=Message)

_numbers = itertools.count(1)
_issued: list[str] = []


def new_mobile() -> str:
    """A distinct valid French mobile number, random per run (NATS streams may outlive a run)."""
    phone = f"+3361{secrets.randbelow(10**3):03d}{next(_numbers):04d}"
    _issued.append(phone)
    return phone


def new_business_number() -> str:
    """A distinct valid San Francisco number (exchange codes start with 2-9)."""
    phone = f"+1415{200 + secrets.randbelow(800)}{next(_numbers):04d}"
    _issued.append(phone)
    return phone


def issued_phones() -> list[str]:
    """Every number handed out so far: none may appear in full in any log."""
    return list(_issued)


def whatsapp(phone: str) -> address_pb2.Address:
    return address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=phone)


@dataclass(frozen=True)
class Shop:
    tenant_id: str
    number: str  # the shop's WhatsApp business number, E.164
    seller: str  # a seller's phone, E.164
    owner_token: str

    @property
    def sender(self) -> str:
        return f"whatsapp:{self.number}"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.owner_token}"),)


def inbound_params(account_sid: str, shop: Shop, sender: str, body: str) -> dict[str, str]:
    """The form of a WhatsApp message from `sender` to the shop, as Twilio posts it (a new
    MessageSid each time; sign it for the gateway's public URL)."""
    sid = "SM" + uuid.uuid4().hex
    params = whatsapp_params(
        MessageSid=sid,
        SmsMessageSid=sid,
        SmsSid=sid,
        AccountSid=account_sid,
        From=f"whatsapp:{sender}",
        WaId=sender.removeprefix("+"),
        To=shop.sender,
        Body=body,
        NumMedia="0",
    )
    params.pop("MediaUrl0")
    params.pop("MediaContentType0")
    return params


class Harness:
    def __init__(self, stack: SystemStack, nats: NatsClient) -> None:
        self.stack = stack
        self.nats = nats
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    def _channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = grpc.aio.insecure_channel(self.stack.address(service))
        return self._channels[service]

    # --- Twilio's side -------------------------------------------------------------------------

    def inbound(self, shop: Shop, sender: str, body: str) -> dict[str, str]:
        """A WhatsApp message from `sender` to the shop, shaped as Twilio sends it."""
        return inbound_params(self.stack.account_sid, shop, sender, body)

    async def post_webhook(self, params: dict[str, str]) -> httpx.Response:
        path = "/webhooks/twilio/messages"
        signature = sign(self.stack.public_base_url + path, params, self.stack.auth_token)
        async with httpx.AsyncClient(base_url=self.stack.public_base_url, timeout=10) as client:
            return await client.post(path, data=params, headers={"X-Twilio-Signature": signature})

    async def send(self, shop: Shop, sender: str, body: str) -> str:
        """Post one inbound message; assert Twilio got its 200 + empty TwiML; its MessageSid."""
        params = self.inbound(shop, sender, body)
        reply = await self.post_webhook(params)
        assert reply.status_code == 200, reply.text
        assert reply.text.endswith("<Response/>")
        return params["MessageSid"]

    async def sandbox_sent(self, to: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.get(
                f"{self.stack.sandbox_url}/_sandbox/messages", params={"to": to}
            )
        reply.raise_for_status()
        return list(reply.json()["messages"])

    async def sandbox_callback(self, twilio_sid: str, status: str) -> int:
        """Have the sandbox post Twilio's signed status callback for a message it accepted;
        the HTTP status the gateway answered."""
        async with httpx.AsyncClient(timeout=20) as client:
            reply = await client.post(
                f"{self.stack.sandbox_url}/_sandbox/messages/{twilio_sid}/callback",
                json={"status": status},
            )
        reply.raise_for_status()
        return int(reply.json()["callback_status"])

    # --- gRPC APIs, as a shop owner --------------------------------------------------------------

    async def enqueue(self, shop: Shop, to: str, body: str) -> str:
        stub = outbox_pb2_grpc.OutboxServiceStub(self._channel("outbox"))
        reply = await stub.Enqueue(
            outbox_pb2.EnqueueRequest(
                tenant_id=shop.tenant_id,
                sender=shop.sender,
                recipient=whatsapp(to),
                body=body,
                kind=outbox_pb2.MESSAGE_KIND_CONVERSATIONAL,
                idempotency_key=f"e2e-{uuid.uuid4().hex}",
            ),
            metadata=shop.metadata,
            timeout=10,
        )
        return reply.message_id

    async def message(self, shop: Shop, message_id: str) -> outbox_pb2.Message:
        stub = outbox_pb2_grpc.OutboxServiceStub(self._channel("outbox"))
        reply = await stub.GetMessage(
            outbox_pb2.GetMessageRequest(tenant_id=shop.tenant_id, message_id=message_id),
            metadata=shop.metadata,
            timeout=10,
        )
        return reply.message

    async def wait_status(
        self, shop: Shop, message_id: str, status: int, timeout_s: float = 20.0
    ) -> outbox_pb2.Message:
        async def reached() -> outbox_pb2.Message | None:
            message = await self.message(shop, message_id)
            return message if message.status == status else None

        return await eventually(reached, timeout_s=timeout_s)

    async def opted_out(self, shop: Shop) -> set[str]:
        stub = routing_pb2_grpc.RoutingServiceStub(self._channel("routing"))
        reply = await stub.ListOptOuts(
            routing_pb2.ListOptOutsRequest(tenant_id=shop.tenant_id, page_size=500),
            metadata=shop.metadata,
            timeout=10,
        )
        return {opt_out.address.value for opt_out in reply.opt_outs}

    async def current_session(self, shop: Shop) -> live_session_pb2.LiveSession | None:
        stub = live_session_pb2_grpc.LiveSessionServiceStub(self._channel("live_session"))
        try:
            reply = await stub.GetCurrentSession(
                live_session_pb2.GetCurrentSessionRequest(tenant_id=shop.tenant_id),
                metadata=shop.metadata,
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return reply.session

    async def close_session(self, shop: Shop, session_id: str) -> None:
        stub = live_session_pb2_grpc.LiveSessionServiceStub(self._channel("live_session"))
        await stub.CloseSession(
            live_session_pb2.CloseSessionRequest(tenant_id=shop.tenant_id, session_id=session_id),
            metadata=shop.metadata,
            timeout=10,
        )

    async def sessions(self, shop: Shop) -> Sequence[live_session_pb2.LiveSession]:
        stub = live_session_pb2_grpc.LiveSessionServiceStub(self._channel("live_session"))
        reply = await stub.ListSessions(
            live_session_pb2.ListSessionsRequest(tenant_id=shop.tenant_id, page_size=100),
            metadata=shop.metadata,
            timeout=10,
        )
        return list(reply.sessions)

    async def metric(self, service: str, sample: str, **labels: str) -> float:
        """The sum of `service`'s samples named `sample` whose labels include `labels`."""
        text = await self.stack.scrape(service)
        return sum(
            found.value
            for family in text_string_to_metric_families(text)
            for found in family.samples
            if found.name == sample and labels.items() <= found.labels.items()
        )

    # --- events on JetStream ---------------------------------------------------------------------

    async def events(
        self, stream: str, subject: str, decode: type[M], matches: Callable[[M], bool]
    ) -> list[M]:
        """Every event on `subject` so far that `matches`, oldest first."""
        return [
            event for event, _ in await self.events_with_headers(stream, subject, decode, matches)
        ]

    async def events_with_headers(
        self, stream: str, subject: str, decode: type[M], matches: Callable[[M], bool]
    ) -> list[tuple[M, dict[str, str]]]:
        """Like `events`, each with its NATS headers (`Nats-Msg-Id`, `traceparent`)."""
        subscription = await self.nats.jetstream().subscribe(
            subject, stream=stream, ordered_consumer=True
        )
        found: list[tuple[M, dict[str, str]]] = []
        try:
            while True:
                try:
                    msg = await subscription.next_msg(timeout=0.3)
                except TimeoutError:
                    return found
                event = decode.FromString(msg.data)
                if matches(event):
                    found.append((event, dict(msg.headers or {})))
        finally:
            await subscription.unsubscribe()

    async def wait_event(
        self,
        stream: str,
        subject: str,
        decode: type[M],
        matches: Callable[[M], bool],
        *,
        count: int = 1,
        timeout_s: float = 20.0,
    ) -> list[M]:
        """Wait until at least `count` matching events were published; all of them."""

        async def published() -> list[M] | None:
            found = await self.events(stream, subject, decode, matches)
            return found if len(found) >= count else None

        return await eventually(published, timeout_s=timeout_s, every_s=0.2)


async def shop_from_api(stack: SystemStack, name: str, tenant: str | None = None) -> Shop:
    """What the dashboard backend does, with an admin token, over seller_admin's gRPC API;
    the tenant id is `name` with a random suffix unless given (for per-tenant settings)."""
    tenant = tenant or f"{name}-{secrets.token_hex(3)}"
    number, seller = new_business_number(), new_mobile()
    admin = (("authorization", f"Bearer {stack.keys.token('admin', sub='e2e')}"),)
    async with grpc.aio.insecure_channel(stack.address("seller_admin")) as channel:
        stub = seller_admin_pb2_grpc.SellerAdminServiceStub(channel)
        await stub.CreateTenant(
            seller_admin_pb2.CreateTenantRequest(tenant_id=tenant, display_name=name.title()),
            metadata=admin,
            timeout=10,
        )
        await stub.AddChannel(
            seller_admin_pb2.AddChannelRequest(
                tenant_id=tenant, address=f"whatsapp:{number}", account_sid=stack.account_sid
            ),
            metadata=admin,
            timeout=10,
        )
        await stub.AddSellerPhone(
            seller_admin_pb2.AddSellerPhoneRequest(tenant_id=tenant, phone_number=seller),
            metadata=admin,
            timeout=10,
        )
    owner = stack.keys.token("owner", tenant, "owner")
    return Shop(tenant, number, seller, owner)
