"""`serve_until_stopped`, the serving part of every gRPC service, over a real socket: on stop
the server goes NOT_SERVING and drains while the background tasks still run, then the tasks
stop, then the metrics endpoint, then what the service opened before."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.grpc_server import GrpcServer, GrpcServerSettings
from infra.grpc_service import open_backends, serve_until_stopped
from infra.retention import RetentionSettings
from infra.shutdown import Shutdown
from infra.streams import audit_stream, events_stream
from infra.supervisor import BackgroundTaskFailed
from tools.stack import reset_service_schema

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME = "snapsell.test.v1.TestService"
LIVE_SESSION_MIGRATIONS = (
    Path(__file__).resolve().parents[3] / "services" / "live_session" / "migrations"
)


@dataclass(frozen=True)
class Serving:
    grpc_port: int = 0
    metrics_port: int = 0
    shutdown_grace_s: float = 0.5


SERVING_CONFIG = Serving()


def local_server() -> GrpcServer:
    return GrpcServer(
        0, [SERVICE_NAME], host="127.0.0.1", settings=GrpcServerSettings(reflection=False)
    )


def closed_steps(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.fields["step"] for r in caplog.records if r.getMessage() == "service.closed"]


async def test_the_server_drains_first_then_the_tasks_then_what_was_opened_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    server = local_server()
    seen_after_stop: list[str] = []
    closed: list[str] = []

    async def background_task() -> None:
        await stop.wait()
        # Still running while the server stops: it sees the server unready (or gone).
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=0.5
                    )
                except grpc.aio.AioRpcError:
                    seen_after_stop.append("server-gone")
                    return
                if reply.status == NOT_SERVING:
                    seen_after_stop.append("not-serving")
                    return
                await asyncio.sleep(0.01)

    async def close_database() -> None:
        closed.append("database")

    async def stop_soon() -> None:
        await asyncio.sleep(0.2)
        stop.set()

    stopper = asyncio.create_task(stop_soon())
    with caplog.at_level(logging.INFO):
        async with Shutdown() as shutdown:
            shutdown.add("database", close_database)
            await serve_until_stopped(
                "test",
                stop,
                shutdown,
                server,
                {"watcher": background_task},
                SERVING_CONFIG,
            )
    await stopper
    assert seen_after_stop in (["not-serving"], ["server-gone"])
    assert closed_steps(caplog) == ["grpc-server", "background-tasks", "metrics", "database"]
    serving = [r for r in caplog.records if r.getMessage() == "test.serving"]
    assert len(serving) == 1 and serving[0].fields["grpc_port"] == server.bound_port


async def test_a_task_that_gave_up_is_raised_after_everything_closed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKGROUND_GIVE_UP_AFTER_S", "1")
    stop = asyncio.Event()
    closed: list[str] = []

    async def crashes() -> None:
        raise RuntimeError("broken")

    async def close_database() -> None:
        closed.append("database")

    with caplog.at_level(logging.INFO), pytest.raises(BackgroundTaskFailed):
        async with Shutdown() as shutdown:
            shutdown.add("database", close_database)
            await asyncio.wait_for(
                serve_until_stopped(
                    "test",
                    stop,
                    shutdown,
                    local_server(),
                    {"crasher": crashes},
                    SERVING_CONFIG,
                ),
                timeout=10,
            )
    assert closed == ["database"]
    assert closed_steps(caplog) == ["grpc-server", "metrics", "database"]


@dataclass(frozen=True)
class Backed:
    nats_url: str
    db_pool_size: int = 2


async def test_open_backends_migrates_connects_declares_streams_and_closes_in_reverse(
    admin_dsn: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    service = "live_session"
    await reset_service_schema(admin_dsn, service)
    with caplog.at_level(logging.INFO):
        async with Shutdown() as shutdown:
            backends = await open_backends(
                service,
                LIVE_SESSION_MIGRATIONS,
                Backed(nats_url),
                shutdown,
                streams=[audit_stream()],
            )
            # The schema is migrated: the service's own tables answer.
            assert await backends.pool.fetchval("SELECT count(*) FROM sessions") == 0
            streams = {info.config.name for info in await backends.js.streams_info()}
            assert {events_stream(service).name, audit_stream().name} <= streams
            assert set(backends.tasks(asyncio.Event(), RetentionSettings(60.0, 100, None))) == {
                "event-relay",
                "retention",
            }
    assert closed_steps(caplog) == ["nats", "database"]
    assert backends.nats.is_closed
    assert backends.pool.is_closing()
