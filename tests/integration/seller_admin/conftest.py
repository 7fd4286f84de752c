"""seller_admin on the session's real PostgreSQL and NATS: a freshly migrated schema per test
module, the event relay, and an in-process gRPC server (real socket, production interceptors)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import grpc
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra import jetstream
from infra.auth import AuthInterceptor, JwtVerifier
from infra.db import create_pool, migrate_service
from infra.events import EventRelay
from infra.grpc_server import GrpcServer
from infra.metrics import RpcMetricsInterceptor
from infra.streams import audit_stream, events_stream
from services.seller_admin.access import SERVICE_FULL_NAME, auth_policy
from services.seller_admin.api import SellerAdminApi
from services.seller_admin.audit_trail import AuditTrail
from tools.dev_keys import DevKeys
from tools.stack import reset_service_schema

SERVICE = "seller_admin"
MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "seller_admin" / "migrations"
ACCOUNT_SID = "AC" + "a1" * 16
OTHER_ACCOUNT_SID = "AC" + "b2" * 16

# A teardown that hangs fails loudly instead of stalling the suite.
TEARDOWN_TIMEOUT_S = 15.0

Metadata = tuple[tuple[str, str], ...]

_numbers = itertools.count(1)


def new_mobile() -> str:
    """A valid French mobile number (E.164) never used before in this test session."""
    return f"+3361{next(_numbers):07d}"


def new_business_number() -> str:
    return f"+3375{next(_numbers):07d}"


@pytest.fixture(scope="module")
async def service_dsn(admin_dsn: str) -> str:
    """A freshly provisioned and migrated schema for each test module."""
    await reset_service_schema(admin_dsn, SERVICE)
    return await migrate_service(SERVICE, MIGRATIONS)


@pytest.fixture(scope="module")
async def pool(service_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(service_dsn, SERVICE, min_size=2, max_size=20)
    yield pool
    await asyncio.wait_for(pool.close(), TEARDOWN_TIMEOUT_S)


@pytest.fixture(scope="module")
async def nats_client(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await jetstream.connect(nats_url, name="seller-admin-tests")
    yield client
    await asyncio.wait_for(client.close(), TEARDOWN_TIMEOUT_S)


@pytest.fixture(scope="module")
async def js(nats_client: NatsClient) -> JetStreamContext:
    context = nats_client.jetstream()
    await jetstream.ensure_stream(context, events_stream(SERVICE))
    await jetstream.ensure_stream(context, audit_stream())
    return context


@pytest.fixture(scope="module")
async def relay(pool: asyncpg.Pool, nats_client: NatsClient) -> AsyncIterator[None]:
    """The event relay the process runs, publishing this module's events to JetStream."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        EventRelay(pool, nats_client, SERVICE, poll_interval_s=0.2).run(stop)
    )
    yield
    stop.set()
    await asyncio.wait_for(task, TEARDOWN_TIMEOUT_S)


@pytest.fixture(scope="module")
async def server_address(
    pool: asyncpg.Pool, js: JetStreamContext, token_keys: DevKeys
) -> AsyncIterator[str]:
    server = GrpcServer(
        0,
        [SERVICE_FULL_NAME],
        [
            RpcMetricsInterceptor(SERVICE),
            AuthInterceptor(JwtVerifier.from_env(audience=SERVICE), auth_policy(), service=SERVICE),
        ],
        host="127.0.0.1",
    )
    seller_admin_pb2_grpc.add_SellerAdminServiceServicer_to_server(
        SellerAdminApi(pool, AuditTrail(js)), server.server
    )
    await server.start()
    yield f"127.0.0.1:{server.bound_port}"
    await asyncio.wait_for(server.stop(1.0), TEARDOWN_TIMEOUT_S)


@pytest.fixture(scope="module")
async def stub(server_address: str) -> AsyncIterator[seller_admin_pb2_grpc.SellerAdminServiceStub]:
    async with grpc.aio.insecure_channel(server_address) as channel:
        yield seller_admin_pb2_grpc.SellerAdminServiceStub(channel)


@pytest.fixture
def bearer(make_token: Callable[..., str]) -> Callable[..., Metadata]:
    """Call metadata carrying a token for `role` (and `tenant_id` for tenant roles)."""

    def metadata(role: str, tenant_id: str | None = None, sub: str = "test") -> Metadata:
        return (("authorization", f"Bearer {make_token(role, tenant_id, sub, SERVICE)}"),)

    return metadata


@pytest.fixture
def admin(bearer: Callable[..., Metadata]) -> Metadata:
    return bearer("admin", sub="ops-admin")


async def create_tenant(
    stub: seller_admin_pb2_grpc.SellerAdminServiceStub, admin: Metadata, tenant_id: str
) -> pb.Tenant:
    reply = await stub.CreateTenant(
        pb.CreateTenantRequest(tenant_id=tenant_id, display_name=f"Shop {tenant_id}"),
        metadata=admin,
    )
    return reply.tenant


async def add_channel(
    stub: seller_admin_pb2_grpc.SellerAdminServiceStub,
    admin: Metadata,
    tenant_id: str,
    address: str,
    account_sid: str = ACCOUNT_SID,
) -> pb.Channel:
    reply = await stub.AddChannel(
        pb.AddChannelRequest(tenant_id=tenant_id, address=address, account_sid=account_sid),
        metadata=admin,
    )
    return reply.channel


async def add_seller(
    stub: seller_admin_pb2_grpc.SellerAdminServiceStub,
    admin: Metadata,
    tenant_id: str,
    phone_number: str,
) -> pb.SellerPhone:
    reply = await stub.AddSellerPhone(
        pb.AddSellerPhoneRequest(tenant_id=tenant_id, phone_number=phone_number), metadata=admin
    )
    return reply.seller_phone
