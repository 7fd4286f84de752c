"""Routing with its real peers, each its own process, as `make run` starts them: the Twilio
sandbox, seller_admin, live_session, outbox and routing, on the session's PostgreSQL and NATS.
A shop is set up through seller_admin's public API; inbound messages are published to the
`INBOUND` stream exactly as the gateway does."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.seller_admin.v1 import seller_admin_pb2, seller_admin_pb2_grpc

from infra import jetstream
from tests.integration.routing.fakes import SELLER, SHOP_NUMBER
from tests.support.polling import eventually
from tests.support.processes import restart, start_service
from tools.dev_keys import DevKeys
from tools.devstack import free_port
from tools.stack import RunningService, reset_service_schema, start_sandbox

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "sandbox-token-routing-tests"
TENANT = "shop-a"
INBOUND_SUBJECT = "gateway.v1.message.received"
SERVICES = ("seller_admin", "live_session", "outbox", "routing")


@dataclass
class Stack:
    admin_dsn: str
    nats: NatsClient
    token_keys: DevKeys
    sandbox: RunningService | None = None
    running: dict[str, RunningService] = field(default_factory=dict)
    db: asyncpg.Pool | None = None

    @property
    def js(self) -> JetStreamContext:
        return self.nats.jetstream()

    async def start(self, routing_env: dict[str, str] | None = None) -> None:
        for service in SERVICES:
            await reset_service_schema(self.admin_dsn, service)
        self.db = await asyncpg.create_pool(self.admin_dsn, min_size=1, max_size=4)
        self.sandbox = await start_sandbox({ACCOUNT_SID: AUTH_TOKEN})
        ports = {name: free_port() for name in SERVICES}
        addr = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        common = {"LOG_LEVEL": "WARNING"}
        self.running["seller_admin"] = await start_service(
            "seller_admin", common, port=ports["seller_admin"]
        )
        self.running["live_session"] = await start_service(
            "live_session", common, port=ports["live_session"]
        )
        self.running["routing"] = await start_service(
            "routing",
            {
                **common,
                "SELLER_ADMIN_ADDR": addr["seller_admin"],
                "LIVE_SESSION_ADDR": addr["live_session"],
                "OUTBOX_ADDR": addr["outbox"],
                # Quick retries and redeliveries so outage and crash tests take seconds.
                "ROUTING_RETRY_DELAY_CAP_SECONDS": "1",
                "ROUTING_ACK_WAIT_SECONDS": "5",
                "ROUTING_SENDER_CACHE_TTL_SECONDS": "2",
                **(routing_env or {}),
            },
            port=ports["routing"],
        )
        self.running["outbox"] = await start_service(
            "outbox",
            {
                **common,
                "ROUTING_ADDR": addr["routing"],
                "SELLER_ADMIN_ADDR": addr["seller_admin"],
                "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "TWILIO_API_BASE_URL": self.sandbox.url,
                "PUBLIC_BASE_URL": "http://127.0.0.1:9",
            },
            port=ports["outbox"],
        )
        await self.set_up_shop()

    async def stop(self) -> None:
        for name in reversed(SERVICES):
            service = self.running.pop(name, None)
            if service is not None:
                service.stop()
        if self.sandbox is not None:
            self.sandbox.stop()
        if self.db is not None:
            await self.db.close()

    def token(self, role: str, tenant_id: str | None = None) -> tuple[tuple[str, str], ...]:
        token = self.token_keys.token(role, tenant_id)
        return (("authorization", f"Bearer {token}"),)

    async def set_up_shop(self) -> None:
        async with grpc.aio.insecure_channel(self.running["seller_admin"].address) as channel:
            stub = seller_admin_pb2_grpc.SellerAdminServiceStub(channel)
            admin = self.token("admin")
            await stub.CreateTenant(
                seller_admin_pb2.CreateTenantRequest(tenant_id=TENANT, display_name="Shop A"),
                metadata=admin,
            )
            await stub.AddChannel(
                seller_admin_pb2.AddChannelRequest(
                    tenant_id=TENANT, address=f"whatsapp:{SHOP_NUMBER}", account_sid=ACCOUNT_SID
                ),
                metadata=admin,
            )
            await stub.AddSellerPhone(
                seller_admin_pb2.AddSellerPhoneRequest(tenant_id=TENANT, phone_number=SELLER),
                metadata=admin,
            )

    async def publish(self, message: gateway_events.MessageReceived, msg_id: str = "") -> None:
        message.account_sid = ACCOUNT_SID
        await jetstream.publish(
            self.js,
            INBOUND_SUBJECT,
            message.SerializeToString(),
            msg_id=msg_id or message.message_sid,
        )

    async def kill(self, name: str) -> None:
        self.running[name].kill()

    async def stop_service(self, name: str) -> None:
        self.running[name].stop()

    async def restart(self, name: str) -> None:
        self.running[name] = await restart(self.running[name])

    async def fetchval(self, query: str, *args: object) -> object:
        assert self.db is not None
        return await self.db.fetchval(query, *args)

    async def processed(self, sids: list[str]) -> int:
        return int(
            await self.fetchval(
                "SELECT count(*) FROM routing.processed_inbound WHERE message_sid = ANY($1)", sids
            )  # type: ignore[arg-type]
        )

    async def wait_processed(self, sids: list[str], timeout_s: float = 60.0) -> None:
        await eventually(lambda: self._all_processed(sids), timeout_s=timeout_s)

    async def _all_processed(self, sids: list[str]) -> bool:
        return await self.processed(sids) == len(sids)


@contextlib.asynccontextmanager
async def nats_connection(url: str) -> AsyncIterator[NatsClient]:
    client = await jetstream.connect(url, name="routing-acceptance")
    try:
        yield client
    finally:
        await client.close()
