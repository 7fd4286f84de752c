"""The real `python -m services.live_session` process: gRPC over a socket, its sweeper, its
event relay to JetStream, its configuration errors, `migrate`, and a clean SIGTERM stop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from snapsell.live_session.v1 import events_pb2
from snapsell.live_session.v1 import live_session_pb2 as pb
from snapsell.live_session.v1.live_session_pb2_grpc import LiveSessionServiceStub

from infra import jetstream
from tests.support.processes import assert_stopped_cleanly, start_service
from tools.dev_keys import DevKeys
from tools.devstack import free_port
from tools.stack import ROOT, RunningService, reset_service_schema, spawn_service

SERVICE = "live_session"
STREAM = "LIVE_SESSION_EVENTS"
SELLER = pb.SIGNAL_KIND_SELLER_MESSAGE


@pytest.fixture(scope="module")
async def service(
    admin_dsn: str, nats_url: str, token_keys: DevKeys
) -> AsyncIterator[RunningService]:
    await reset_service_schema(admin_dsn, SERVICE)
    running = await start_service(
        SERVICE,
        {
            "DATABASE_URL": admin_dsn,
            "NATS_URL": nats_url,
            "LIVE_SESSION_INACTIVITY_WINDOW_MINUTES": "1",
            "LIVE_SESSION_SWEEP_INTERVAL_SECONDS": "0.2",
        },
    )
    yield running
    assert_stopped_cleanly(running)


@pytest.fixture(scope="module")
async def admin_conn(admin_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(admin_dsn, server_settings={"search_path": SERVICE})
    yield conn
    await conn.close()


@pytest.fixture
async def stub(service: RunningService) -> AsyncIterator[LiveSessionServiceStub]:
    async with grpc.aio.insecure_channel(service.address) as channel:
        yield LiveSessionServiceStub(channel)


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    client = await jetstream.connect(nats_url, name="live-session-test")
    yield client.jetstream()
    await client.close()


@pytest.fixture
def service_metadata(make_token: Callable[..., str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {make_token('service', sub='routing')}"),)


async def find_event(
    js: JetStreamContext, subject: str, session_id: str, timeout_s: float = 10.0
) -> Msg:
    """The first message on `subject` about `session_id` (the stream may hold older runs')."""
    message_type = (
        events_pb2.LiveSessionCreated
        if subject.endswith("created")
        else events_pb2.LiveSessionClosed
    )
    subscription = await js.subscribe(subject, stream=STREAM, ordered_consumer=True)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                msg = await subscription.next_msg(timeout=timeout_s)
                if message_type.FromString(msg.data).session_id == session_id:
                    return msg
    finally:
        await subscription.unsubscribe()


async def test_touch_through_the_process_relays_created_event_to_jetstream(
    stub, service_metadata, js, admin_conn
) -> None:
    tenant = f"proc-{uuid.uuid4().hex[:8]}"
    reply = await stub.Touch(
        pb.TouchRequest(tenant_id=tenant, signal_kind=SELLER, correlation_id="SM42"),
        metadata=service_metadata,
    )
    assert reply.created

    msg = await find_event(js, "live_session.v1.session.created", reply.session.session_id)
    event = events_pb2.LiveSessionCreated.FromString(msg.data)
    assert (event.tenant_id, event.correlation_id) == (tenant, "SM42")
    event_id = await admin_conn.fetchval(
        "SELECT id FROM events WHERE aggregate_id = $1", reply.session.session_id
    )
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == str(event_id)


async def test_200_concurrent_touch_calls_over_20_tenants_open_exactly_20_sessions(
    stub, service_metadata, admin_conn
) -> None:
    prefix = f"conc-{uuid.uuid4().hex[:6]}"
    tenants = [f"{prefix}-{i}" for i in range(20)]
    replies = await asyncio.gather(
        *(
            stub.Touch(
                pb.TouchRequest(tenant_id=tenants[i % 20], signal_kind=SELLER),
                metadata=service_metadata,
            )
            for i in range(200)
        )
    )

    ids: dict[str, set[str]] = {}
    for reply in replies:
        ids.setdefault(reply.session.tenant_id, set()).add(reply.session.session_id)
    assert sorted(ids) == sorted(tenants)
    assert all(len(found) == 1 for found in ids.values())
    active = await admin_conn.fetch(
        "SELECT tenant_id, id FROM sessions WHERE status = 'active' AND tenant_id LIKE $1",
        f"{prefix}-%",
    )
    assert {row["tenant_id"]: {str(row["id"])} for row in active} == ids


async def test_the_process_sweeper_closes_idle_sessions_and_relays_closed_events(
    service, js, admin_conn
) -> None:
    session_id = uuid.uuid4()
    idle_since = datetime.now(UTC) - timedelta(minutes=2)
    await admin_conn.execute(
        "INSERT INTO sessions (id, tenant_id, status, started_at, last_activity_at)"
        " VALUES ($1, $2, 'active', $3, $3)",
        session_id,
        f"idle-{session_id.hex[:8]}",
        idle_since,
    )

    msg = await find_event(js, "live_session.v1.session.closed", str(session_id))
    event = events_pb2.LiveSessionClosed.FromString(msg.data)
    assert event.reason == pb.CLOSE_REASON_IDLE
    row = await admin_conn.fetchrow(
        "SELECT status, close_reason FROM sessions WHERE id = $1", session_id
    )
    assert (row["status"], row["close_reason"]) == ("closed", "idle")


async def test_a_bad_window_stops_the_process_with_one_line(
    admin_dsn, nats_url, token_keys
) -> None:
    # Every rejected value is covered by the config unit tests; this proves the process exits.
    window = {"LIVE_SESSION_INACTIVITY_WINDOW_MINUTES": "0"}
    process = spawn_service(SERVICE, {"DATABASE_URL": admin_dsn, "NATS_URL": nats_url, **window})
    try:
        returncode = await asyncio.to_thread(process.process.wait, 20)
    finally:
        process.kill()
    assert returncode == 2
    error_lines = [line for line in process.logs().splitlines() if "configuration error" in line]
    assert error_lines == [
        f"{SERVICE}: configuration error: "
        "LIVE_SESSION_INACTIVITY_WINDOW_MINUTES must be between 1 and 1440, got 0"
    ]


async def test_migrate_subcommand_provisions_and_exits_0(admin_dsn, admin_conn) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", f"services.{SERVICE}", "migrate"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": admin_dsn},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert await admin_conn.fetchval(
        "SELECT count(*) FROM schema_migrations WHERE name = 'live_session/001_sessions.sql'"
    )


async def test_sigterm_stops_the_process_cleanly(admin_dsn, nats_url, token_keys) -> None:
    running = await start_service(
        SERVICE, {"DATABASE_URL": admin_dsn, "NATS_URL": nats_url}, port=free_port()
    )
    assert_stopped_cleanly(running)
    assert '"event":"service.stopped"' in running.logs()
