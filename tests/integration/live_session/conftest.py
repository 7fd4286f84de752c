"""The live_session schema on the session's real PostgreSQL, a store driven by a manual clock,
and an in-process gRPC server (real sockets, the production interceptors) around it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from snapsell.live_session.v1 import live_session_pb2_grpc

from infra.auth import AuthInterceptor, JwtVerifier
from infra.db import create_pool, migrate_service
from infra.grpc_server import GrpcServer
from infra.metrics import RpcMetricsInterceptor
from services.live_session.api import ACCESS_POLICY, SERVICE_FULL_NAME, LiveSessionApi
from services.live_session.domain import ManualClock
from services.live_session.store import SessionStore
from services.live_session.touch_batcher import TouchBatcher
from tools.dev_keys import DevKeys
from tools.stack import reset_service_schema

SERVICE = "live_session"
MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "live_session" / "migrations"
WINDOW = timedelta(minutes=45)


@pytest.fixture(scope="module")
async def service_dsn(admin_dsn: str) -> str:
    """A freshly provisioned and migrated schema for each test module."""
    await reset_service_schema(admin_dsn, SERVICE)
    return await migrate_service(SERVICE, MIGRATIONS)


@pytest.fixture(scope="module")
async def pool(service_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    # Larger than a service's default so concurrency tests race real connections.
    pool = await create_pool(service_dsn, SERVICE, min_size=2, max_size=30)
    yield pool
    await pool.close()


@pytest.fixture
async def clean_tables(pool: asyncpg.Pool) -> None:
    await pool.execute("TRUNCATE sessions, events")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(pool: asyncpg.Pool, clock: ManualClock, clean_tables: None) -> SessionStore:
    return SessionStore(pool, clock, WINDOW)


@pytest.fixture
async def channel(store: SessionStore, token_keys: DevKeys) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to an in-process server serving `store` over a real socket."""
    server = GrpcServer(
        0,
        [SERVICE_FULL_NAME],
        [
            RpcMetricsInterceptor(SERVICE),
            AuthInterceptor(JwtVerifier.from_env(audience=SERVICE), ACCESS_POLICY, service=SERVICE),
        ],
        host="127.0.0.1",
    )
    live_session_pb2_grpc.add_LiveSessionServiceServicer_to_server(
        LiveSessionApi(store, TouchBatcher(store)), server.server
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
        yield channel
    await server.stop(1.0)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> live_session_pb2_grpc.LiveSessionServiceStub:
    return live_session_pb2_grpc.LiveSessionServiceStub(channel)


@pytest.fixture
def bearer(make_token: Callable[..., str]) -> Callable[..., tuple[tuple[str, str], ...]]:
    """Call metadata carrying a token for `role` (and `tenant_id` for tenant roles)."""

    def metadata(
        role: str, tenant_id: str | None = None, sub: str = "test"
    ) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {make_token(role, tenant_id, sub, SERVICE)}"),)

    return metadata
