"""The gRPC API over a real socket with the production auth and metrics interceptors, backed by
the real store and PostgreSQL (manual clock): behaviour, validation and access rules."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg
import grpc
import pytest
from snapsell.live_session.v1 import live_session_pb2 as pb
from snapsell.live_session.v1.live_session_pb2_grpc import (
    LiveSessionServiceStub,
    add_LiveSessionServiceServicer_to_server,
)

from infra.auth import AuthInterceptor, JwtVerifier
from infra.db import create_pool
from infra.grpc_server import GrpcServer
from services.live_session.api import ACCESS_POLICY, SERVICE_FULL_NAME, LiveSessionApi
from services.live_session.domain import ManualClock
from services.live_session.store import SessionStore
from tests.integration.live_session.conftest import WINDOW
from tools.dev_keys import DevKeys

Bearer = Callable[..., tuple[tuple[str, str], ...]]
SELLER = pb.SIGNAL_KIND_SELLER_MESSAGE


async def touch(stub: LiveSessionServiceStub, bearer: Bearer, tenant: str) -> pb.TouchResponse:
    request = pb.TouchRequest(tenant_id=tenant, signal_kind=SELLER, correlation_id="SM1")
    return await stub.Touch(request, metadata=bearer("service", sub="routing"))


async def status_of(call: Awaitable[object]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def test_touch_opens_then_reuses_the_session(stub, bearer) -> None:
    first = await touch(stub, bearer, "shop-1")
    second = await touch(stub, bearer, "shop-1")

    assert first.created and not second.created
    assert first.session.session_id == second.session.session_id
    assert first.session.status == pb.SESSION_STATUS_ACTIVE
    assert not first.session.HasField("closed_at")
    assert first.session.close_reason == pb.CLOSE_REASON_UNSPECIFIED


async def test_touch_existing_only_never_opens_a_session(stub, bearer, pool) -> None:
    routing = bearer("service", sub="routing")
    request = pb.TouchRequest(
        tenant_id="shop-1",
        signal_kind=pb.SIGNAL_KIND_CLIENT_ITEM_CODE,
        correlation_id="SM1",
        existing_only=True,
    )
    alone = await stub.Touch(request, metadata=routing)
    assert not alone.HasField("session") and not alone.created
    assert await pool.fetchval("SELECT count(*) FROM sessions") == 0

    opened = await touch(stub, bearer, "shop-1")
    extended = await stub.Touch(request, metadata=routing)
    assert extended.session.session_id == opened.session.session_id
    assert not extended.created


async def test_200_concurrent_touches_over_20_tenants_give_one_session_each(
    stub, bearer, pool: asyncpg.Pool
) -> None:
    tenants = [f"shop-{i}" for i in range(20)]
    calls = [touch(stub, bearer, tenants[i % 20]) for i in range(200)]
    replies = await asyncio.gather(*calls)

    ids: dict[str, set[str]] = {}
    for reply in replies:
        ids.setdefault(reply.session.tenant_id, set()).add(reply.session.session_id)
    assert {tenant: len(found) for tenant, found in ids.items()} == dict.fromkeys(tenants, 1)
    assert sum(reply.created for reply in replies) == 20
    active = await pool.fetch("SELECT tenant_id, id FROM sessions WHERE status = 'active'")
    assert len(active) == 20
    assert {row["tenant_id"]: {str(row["id"])} for row in active} == ids


async def test_get_current_session_and_not_found_once_idle(
    stub, bearer, clock: ManualClock
) -> None:
    opened = await touch(stub, bearer, "shop-1")
    reply = await stub.GetCurrentSession(
        pb.GetCurrentSessionRequest(), metadata=bearer("staff", "shop-1")
    )
    assert reply.session == opened.session

    clock.advance(WINDOW)
    call = stub.GetCurrentSession(pb.GetCurrentSessionRequest(), metadata=bearer("owner", "shop-1"))
    assert await status_of(call) == grpc.StatusCode.NOT_FOUND


async def test_close_session_is_idempotent(stub, bearer, clock: ManualClock) -> None:
    opened = await touch(stub, bearer, "shop-1")
    clock.advance(timedelta(minutes=3))
    request = pb.CloseSessionRequest(session_id=opened.session.session_id, correlation_id="op")
    first = await stub.CloseSession(request, metadata=bearer("manager", "shop-1"))
    again = await stub.CloseSession(request, metadata=bearer("owner", "shop-1"))

    assert first.closed_now and not again.closed_now
    assert first.session.status == pb.SESSION_STATUS_CLOSED
    assert first.session.close_reason == pb.CLOSE_REASON_MANUAL
    assert first.session.closed_at.ToDatetime() == clock.now().replace(tzinfo=None)
    assert again.session == first.session


async def test_admin_closes_sessions_of_the_tenant_it_names_and_no_service_may(
    stub, bearer
) -> None:
    a = await touch(stub, bearer, "shop-a")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CloseSession(
            pb.CloseSessionRequest(tenant_id="shop-a", session_id=a.session.session_id),
            metadata=bearer("service", sub="routing"),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    by_admin = await stub.CloseSession(
        pb.CloseSessionRequest(tenant_id="shop-a", session_id=a.session.session_id),
        metadata=bearer("admin"),
    )
    assert by_admin.closed_now


async def test_list_sessions_pages_with_tokens_and_filters(
    stub, bearer, clock: ManualClock
) -> None:
    opened = []
    for _ in range(5):
        opened.append((await touch(stub, bearer, "shop-1")).session.session_id)
        clock.advance(WINDOW)
    await touch(stub, bearer, "shop-1")  # closes the fifth as idle, opens a sixth
    owner = bearer("owner", "shop-1")

    listed, token = [], ""
    while True:
        page = await stub.ListSessions(
            pb.ListSessionsRequest(page_size=4, page_token=token), metadata=owner
        )
        listed += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert len(listed) == 6 and listed[1:] == list(reversed(opened))
    closed = await stub.ListSessions(
        pb.ListSessionsRequest(tenant_id="shop-1", status=pb.SESSION_STATUS_CLOSED),
        metadata=bearer("admin"),
    )
    assert [s.session_id for s in closed.sessions] == list(reversed(opened))
    assert all(s.close_reason == pb.CLOSE_REASON_IDLE for s in closed.sessions)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.TouchRequest(tenant_id="", signal_kind=SELLER), "tenant_id is required"),
        (pb.TouchRequest(tenant_id="shop-1"), "signal_kind must be"),
        (pb.TouchRequest(tenant_id="shop-1", signal_kind=99), "signal_kind must be"),
        (pb.TouchRequest(tenant_id=" shop", signal_kind=SELLER), "tenant_id must be"),
        (
            pb.TouchRequest(tenant_id="shop-1", signal_kind=SELLER, correlation_id="x" * 257),
            "correlation_id must be at most 256",
        ),
    ],
)
async def test_touch_rejects_invalid_requests(stub, bearer, request_, message) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Touch(request_, metadata=bearer("service", sub="routing"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    assert "\n" not in (caught.value.details() or "")


async def test_other_invalid_requests_are_invalid_argument(stub, bearer) -> None:
    owner = bearer("owner", "shop-1")
    calls = [
        stub.CloseSession(pb.CloseSessionRequest(session_id=""), metadata=owner),
        stub.CloseSession(pb.CloseSessionRequest(session_id="nope"), metadata=owner),
        stub.ListSessions(pb.ListSessionsRequest(page_size=-1), metadata=owner),
        stub.ListSessions(pb.ListSessionsRequest(page_token="!!"), metadata=owner),
        stub.ListSessions(pb.ListSessionsRequest(status=7), metadata=owner),
    ]
    for call in calls:
        assert await status_of(call) == grpc.StatusCode.INVALID_ARGUMENT


async def test_closing_an_unknown_or_foreign_session_is_not_found(stub, bearer) -> None:
    foreign = await touch(stub, bearer, "shop-b")
    for session_id in (str(uuid.uuid4()), foreign.session.session_id):
        call = stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id), metadata=bearer("owner", "shop-a")
        )
        assert await status_of(call) == grpc.StatusCode.NOT_FOUND
    current = await stub.GetCurrentSession(
        pb.GetCurrentSessionRequest(tenant_id="shop-b"), metadata=bearer("admin")
    )
    assert current.session.status == pb.SESSION_STATUS_ACTIVE


# (role, tenant claim, method, request) -> expected code; None means allowed.
ACCESS_CASES = [
    ("owner", "shop-1", "Touch", pb.TouchRequest(tenant_id="shop-1", signal_kind=SELLER)),
    ("admin", None, "Touch", pb.TouchRequest(tenant_id="shop-1", signal_kind=SELLER)),
    ("service", None, "GetCurrentSession", pb.GetCurrentSessionRequest(tenant_id="shop-1")),
    ("service", None, "ListSessions", pb.ListSessionsRequest(tenant_id="shop-1")),
    ("staff", "shop-1", "CloseSession", pb.CloseSessionRequest(session_id=str(uuid.uuid4()))),
    ("staff", "shop-2", "GetCurrentSession", pb.GetCurrentSessionRequest(tenant_id="shop-1")),
    ("manager", "shop-2", "ListSessions", pb.ListSessionsRequest(tenant_id="shop-1")),
    (
        "owner",
        "shop-2",
        "CloseSession",
        pb.CloseSessionRequest(tenant_id="shop-1", session_id=str(uuid.uuid4())),
    ),
    # Platform roles act across tenants, so they must say which one.
    ("admin", None, "GetCurrentSession", pb.GetCurrentSessionRequest()),
]


@pytest.mark.parametrize(("role", "tenant", "method", "request_"), ACCESS_CASES)
async def test_roles_outside_the_policy_or_tenant_are_denied(
    stub, bearer, role, tenant, method, request_
) -> None:
    call = getattr(stub, method)(request_, metadata=bearer(role, tenant))
    assert await status_of(call) == grpc.StatusCode.PERMISSION_DENIED


async def test_calls_without_a_valid_token_are_unauthenticated(stub) -> None:
    request = pb.TouchRequest(tenant_id="shop-1", signal_kind=SELLER)
    assert await status_of(stub.Touch(request)) == grpc.StatusCode.UNAUTHENTICATED
    forged = (("authorization", "Bearer not-a-jwt"),)
    assert await status_of(stub.Touch(request, metadata=forged)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


async def test_a_database_outage_is_unavailable_with_a_one_line_message(
    service_dsn: str, clock: ManualClock, token_keys: DevKeys, bearer
) -> None:
    closed_pool = await create_pool(service_dsn, "live_session", min_size=1, max_size=1)
    await closed_pool.close()
    store = SessionStore(closed_pool, clock, WINDOW)
    server = GrpcServer(
        0,
        [SERVICE_FULL_NAME],
        [AuthInterceptor(JwtVerifier.from_env(audience="live_session"), ACCESS_POLICY)],
        host="127.0.0.1",
    )
    add_LiveSessionServiceServicer_to_server(LiveSessionApi(store, store), server.server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await touch(LiveSessionServiceStub(channel), bearer, "shop-1")
    finally:
        await server.stop(0)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "database unavailable, retry"
