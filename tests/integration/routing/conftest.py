"""The routing schema on the session's real PostgreSQL, an in-process gRPC server (real sockets,
the production interceptors) around it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import grpc
import pytest
from snapsell.routing.v1 import routing_pb2_grpc

from infra.auth import AuthInterceptor, JwtVerifier
from infra.db import create_pool, migrate_service
from infra.grpc_server import GrpcServer
from infra.metrics import RpcMetricsInterceptor
from services.routing.api import ACCESS_POLICY, SERVICE_FULL_NAME, RoutingApi
from services.routing.domain import ConsentScope, RulesBook, TenantRules
from tools.dev_keys import DevKeys
from tools.stack import reset_service_schema

SERVICE = "routing"
MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "routing" / "migrations"
# Every tenant's consent is per person (the default) but this one's, narrowed to the channel.
CHANNEL_SCOPED_TENANT = "shop-by-channel"
RULES = RulesBook(tenants={CHANNEL_SCOPED_TENANT: TenantRules(consent_scope=ConsentScope.CHANNEL)})
TABLES = "processed_inbound, opt_outs, consent_log, last_inbound, failed_inbound, events"


@pytest.fixture(scope="module")
async def service_dsn(admin_dsn: str) -> str:
    """A freshly provisioned and migrated schema for each test module."""
    await reset_service_schema(admin_dsn, SERVICE)
    return await migrate_service(SERVICE, MIGRATIONS)


@pytest.fixture(scope="module")
async def pool(service_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(service_dsn, SERVICE, min_size=2, max_size=30)
    yield pool
    await pool.close()


@pytest.fixture
async def clean(pool: asyncpg.Pool) -> asyncpg.Pool:
    await pool.execute(f"TRUNCATE {TABLES}")
    return pool


@pytest.fixture
async def stub(
    clean: asyncpg.Pool, token_keys: DevKeys
) -> AsyncIterator[routing_pb2_grpc.RoutingServiceStub]:
    server = GrpcServer(
        0,
        [SERVICE_FULL_NAME],
        [
            RpcMetricsInterceptor(SERVICE),
            AuthInterceptor(JwtVerifier.from_env(audience=SERVICE), ACCESS_POLICY, service=SERVICE),
        ],
        host="127.0.0.1",
    )
    routing_pb2_grpc.add_RoutingServiceServicer_to_server(RoutingApi(clean, RULES), server.server)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
        yield routing_pb2_grpc.RoutingServiceStub(channel)
    await server.stop(1.0)


@pytest.fixture
def bearer(make_token: Callable[..., str]) -> Callable[..., tuple[tuple[str, str], ...]]:
    def metadata(
        role: str, tenant_id: str | None = None, sub: str = "test"
    ) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {make_token(role, tenant_id, sub, SERVICE)}"),)

    return metadata
