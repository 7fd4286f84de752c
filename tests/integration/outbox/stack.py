"""The outbox with its real peers, each its own process: the Twilio sandbox, routing (consent)
and one or more outbox processes, on the session's PostgreSQL and NATS. Assertions read the
outbox schema and the sandbox's record of what it accepted."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import grpc
import httpx
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc
from snapsell.seller_admin.v1 import seller_admin_pb2, seller_admin_pb2_grpc

from infra import jetstream
from infra.streams import INBOUND_MESSAGE_SUBJECT, inbound_stream
from tests.support.polling import eventually
from tests.support.processes import start_service
from tools.dev_keys import DevKeys
from tools.devstack import free_port
from tools.stack import RunningService, reset_service_schema, start_sandbox

ACCOUNT_SID = "AC" + "5" * 32
AUTH_TOKEN = "sandbox-token-outbox-tests"
PUBLIC_BASE_URL = "http://127.0.0.1:9/public"
TENANT = "shop-outbox"
SMS_SENDER = "+14155550100"
WHATSAPP_SENDER = "whatsapp:+14155238886"
TERMINAL = ("sent", "delivered", "read", "failed", "undelivered", "blocked", "dead", "discarded")
# Quick retries, reconciliations and leases, so fault and crash tests take seconds.
FAST_OUTBOX_ENV = {
    "OUTBOX_BACKOFF_BASE_SECONDS": "0.05",
    "OUTBOX_BACKOFF_CAP_SECONDS": "0.4",
    "OUTBOX_RETRY_AFTER_CAP_SECONDS": "1",
    "OUTBOX_RECONCILE_DELAY_SECONDS": "0.3",
    "OUTBOX_RECONCILE_CLOCK_SKEW_SECONDS": "2",
    "OUTBOX_SEND_TIMEOUT_SECONDS": "1",
    "OUTBOX_LEASE_SECONDS": "3",
    "OUTBOX_CONSENT_RETRY_SECONDS": "0.2",
    "OUTBOX_POLL_INTERVAL_SECONDS": "0.2",
}
_numbers = itertools.count(10_000_000)


def new_phone() -> str:
    """A distinct French mobile number per call."""
    return f"+336{next(_numbers):08d}"


def sms(value: str) -> address_pb2.Address:
    return address_pb2.Address(channel=address_pb2.CHANNEL_SMS, value=value)


def whatsapp(value: str) -> address_pb2.Address:
    return address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=value)


@dataclass
class OutboxStack:
    admin_dsn: str
    nats_url: str
    token_keys: DevKeys
    sandbox: RunningService | None = None
    routing: RunningService | None = None
    seller_admin: RunningService | None = None
    outboxes: list[RunningService] = field(default_factory=list)
    db: asyncpg.Pool | None = None
    nats: NatsClient | None = None
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def start(self) -> None:
        """Sandbox, seller_admin (the channel directory the outbox checks senders against, and
        where routing resolves an inbound message's tenant) with TENANT's SMS and WhatsApp
        channels registered, and routing."""
        for service in ("outbox", "routing", "seller_admin"):
            await reset_service_schema(self.admin_dsn, service)
        self.db = await asyncpg.create_pool(self.admin_dsn, min_size=1, max_size=4)
        self.nats = await jetstream.connect(self.nats_url, name="outbox-tests")
        self.sandbox = await start_sandbox({ACCOUNT_SID: AUTH_TOKEN})
        self.seller_admin = await start_service("seller_admin", {"LOG_LEVEL": "WARNING"})
        await self.add_channels(TENANT, SMS_SENDER, WHATSAPP_SENDER)
        self.routing = await start_service(
            "routing",
            {
                "LOG_LEVEL": "WARNING",
                "SELLER_ADMIN_ADDR": self.seller_admin.address,
                "LIVE_SESSION_ADDR": "127.0.0.1:9",
                "OUTBOX_ADDR": "127.0.0.1:9",
            },
        )

    def seller_admin_stub(self) -> seller_admin_pb2_grpc.SellerAdminServiceStub:
        assert self.seller_admin is not None
        channel = grpc.aio.insecure_channel(self.seller_admin.address)
        self._channels.append(channel)
        return seller_admin_pb2_grpc.SellerAdminServiceStub(channel)

    async def add_channels(
        self, tenant_id: str, *addresses: str, account_sid: str = ACCOUNT_SID
    ) -> None:
        """The tenant (created if new) may send from these addresses (numbers or MG SIDs)."""
        admin = self.metadata("admin")
        stub = self.seller_admin_stub()
        await stub.CreateTenant(
            seller_admin_pb2.CreateTenantRequest(tenant_id=tenant_id, display_name=tenant_id),
            metadata=admin,
        )
        for address in addresses:
            await stub.AddChannel(
                seller_admin_pb2.AddChannelRequest(
                    tenant_id=tenant_id, address=address, account_sid=account_sid
                ),
                metadata=admin,
            )

    async def publish_inbound(self, sender: str, body: str, received_at: datetime) -> None:
        """A client's WhatsApp message to the shop, as the gateway publishes it."""
        assert self.nats is not None
        stamp = Timestamp()
        stamp.FromDatetime(received_at)
        message = gateway_events.MessageReceived(
            # Unique across runs: JetStream drops a Nats-Msg-Id it saw in its duplicate window.
            message_sid=f"SM{uuid.uuid4().hex}",
            account_sid=ACCOUNT_SID,
            sender=whatsapp(sender),
            recipient=whatsapp(WHATSAPP_SENDER.removeprefix("whatsapp:")),
            body=body,
            received_at=stamp,
        )
        js = self.nats.jetstream()
        await jetstream.ensure_stream(js, inbound_stream())
        await jetstream.publish(
            js, INBOUND_MESSAGE_SUBJECT, message.SerializeToString(), msg_id=message.message_sid
        )

    async def start_outbox(self, **env: str) -> RunningService:
        assert self.sandbox is not None and self.routing is not None
        assert self.seller_admin is not None
        service = await start_service(
            "outbox",
            {
                "LOG_LEVEL": "WARNING",
                "ROUTING_ADDR": self.routing.address,
                "SELLER_ADMIN_ADDR": self.seller_admin.address,
                "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "TWILIO_API_BASE_URL": self.sandbox.url,
                "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
                **FAST_OUTBOX_ENV,
                **env,
            },
            port=free_port(),
        )
        self.outboxes.append(service)
        return service

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close()
        for service in [*self.outboxes, self.routing, self.seller_admin]:
            if service is not None:
                service.stop()
        if self.sandbox is not None:
            self.sandbox.stop()
        if self.nats is not None:
            await self.nats.close()
        if self.db is not None:
            await self.db.close()

    # --- gRPC ------------------------------------------------------------------------------

    def metadata(
        self, role: str = "service", tenant_id: str | None = None, *, sub: str = "routing"
    ) -> Any:
        """A `service` token is routing's (the outbox's real caller) unless `sub` says which."""
        token = self.token_keys.token(role, tenant_id, sub if role == "service" else f"test-{role}")
        return (("authorization", f"Bearer {token}"),)

    def outbox(self, service: RunningService | None = None) -> outbox_pb2_grpc.OutboxServiceStub:
        target = service or next(s for s in self.outboxes if s.process.poll() is None)
        channel = grpc.aio.insecure_channel(target.address)
        self._channels.append(channel)
        return outbox_pb2_grpc.OutboxServiceStub(channel)

    def routing_stub(self) -> routing_pb2_grpc.RoutingServiceStub:
        assert self.routing is not None
        channel = grpc.aio.insecure_channel(self.routing.address)
        self._channels.append(channel)
        return routing_pb2_grpc.RoutingServiceStub(channel)

    async def enqueue(self, **fields: Any) -> str:
        request = outbox_pb2.EnqueueRequest(
            tenant_id=fields.pop("tenant_id", TENANT),
            sender=fields.pop("sender", SMS_SENDER),
            idempotency_key=fields.pop("idempotency_key", f"key-{next(_numbers)}"),
            **fields,
        )
        # As routing, the outbox's one service caller (and the only one of COMPLIANCE messages).
        reply = await self.outbox().Enqueue(request, metadata=self.metadata(), timeout=10)
        return reply.message_id

    async def enqueue_many(
        self, requests: Sequence[dict[str, Any]], concurrency: int = 32
    ) -> list[str]:
        slots = asyncio.Semaphore(concurrency)

        async def one(fields: dict[str, Any]) -> str:
            async with slots:
                return await self.enqueue(**fields)

        return list(await asyncio.gather(*(one(dict(r)) for r in requests)))

    async def get(self, message_id: str, tenant_id: str = TENANT) -> outbox_pb2.Message:
        reply = await self.outbox().GetMessage(
            outbox_pb2.GetMessageRequest(tenant_id=tenant_id, message_id=message_id),
            metadata=self.metadata("admin"),
            timeout=10,
        )
        return reply.message

    async def opt_out(self, address: address_pb2.Address, tenant_id: str = TENANT) -> None:
        await self.routing_stub().SetConsent(
            routing_pb2.SetConsentRequest(
                tenant_id=tenant_id,
                address=address,
                state=routing_pb2.CONSENT_STATE_OPTED_OUT,
                reason="asked by phone",
            ),
            metadata=self.metadata("owner", tenant_id),
            timeout=10,
        )

    async def check_opt_out(
        self, address: address_pb2.Address, tenant_id: str = TENANT
    ) -> routing_pb2.CheckOptOutResponse:
        return await self.routing_stub().CheckOptOut(
            routing_pb2.CheckOptOutRequest(tenant_id=tenant_id, address=address),
            metadata=self.metadata(sub="outbox"),
            timeout=10,
        )

    # --- waiting and looking ------------------------------------------------------------------

    async def status_of(self, message_id: str) -> str | None:
        assert self.db is not None
        return await self.db.fetchval(
            "SELECT status FROM outbox.messages WHERE id = $1::uuid", message_id
        )

    async def wait_status(self, message_id: str, *statuses: str, timeout_s: float = 20) -> None:
        async def reached() -> bool:
            return await self.status_of(message_id) in statuses

        await eventually(reached, timeout_s=timeout_s)

    async def count(self, query: str, *args: object) -> int:
        assert self.db is not None
        return int(await self.db.fetchval(query, *args))

    async def sandbox_messages(self, to: str | None = None) -> list[dict[str, Any]]:
        assert self.sandbox is not None
        params = {"to": to} if to else {}
        async with httpx.AsyncClient(timeout=30) as client:
            reply = await client.get(f"{self.sandbox.url}/_sandbox/messages", params=params)
        reply.raise_for_status()
        return list(reply.json()["messages"])

    async def set_faults(self, **config: Any) -> None:
        assert self.sandbox is not None
        async with httpx.AsyncClient() as client:
            reply = await client.post(f"{self.sandbox.url}/_sandbox/faults", json=config)
        reply.raise_for_status()

    async def reset_sandbox(self) -> None:
        assert self.sandbox is not None
        async with httpx.AsyncClient() as client:
            (await client.post(f"{self.sandbox.url}/_sandbox/reset")).raise_for_status()

    async def recorded_events(self, subject: str, message_id: str) -> list[bytes]:
        """Payloads of the events recorded for one message, oldest first."""
        assert self.db is not None
        rows = await self.db.fetch(
            "SELECT payload FROM outbox.events WHERE subject = $1 AND aggregate_id = $2"
            " ORDER BY id",
            subject,
            message_id,
        )
        return [bytes(row["payload"]) for row in rows]

    async def watch(self, subject: str) -> JetStreamContext.PushSubscription:
        """Events relayed to OUTBOX_EVENTS on `subject` from now on (older ones are skipped:
        the stream outlives test modules)."""
        assert self.nats is not None
        return await self.nats.jetstream().subscribe(
            subject,
            stream="OUTBOX_EVENTS",
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        )


async def next_event(
    subscription: JetStreamContext.PushSubscription,
    decode: type[Message],
    matches: Callable[[Any], bool],
    timeout_s: float = 10.0,
) -> Any:
    """The first event on the subscription that `matches` (TimeoutError if none comes)."""
    async with asyncio.timeout(timeout_s):
        while True:
            msg = await subscription.next_msg(timeout=timeout_s)
            event = decode.FromString(msg.data)
            if matches(event):
                return event


def bodies(messages: Sequence[dict[str, Any]]) -> list[str]:
    return [str(m["body"]) for m in messages]
