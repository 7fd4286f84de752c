"""The crash policy of every service's background tasks (`infra.supervisor`), with the health
status read over a real gRPC socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.grpc_server import GrpcServer, GrpcServerSettings
from infra.supervisor import BackgroundTaskFailed, BackgroundTasks, CrashPolicy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME = "snapsell.test.v1.TestService"

FAST = CrashPolicy(restart_pause_s=0.05, max_pause_s=0.2, stable_s=0.3, give_up_after_s=60.0)


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    server = GrpcServer(
        0, [SERVICE_NAME], host="127.0.0.1", settings=GrpcServerSettings(reflection=False)
    )
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture
async def health(server: GrpcServer) -> AsyncIterator[health_pb2_grpc.HealthStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
        yield health_pb2_grpc.HealthStub(channel)


async def status(health: health_pb2_grpc.HealthStub, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    reply = await health.Check(request, timeout=2)
    return int(reply.status)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Flaky:
    """A loop that crashes its first `crashes` runs, then runs until stop."""

    def __init__(self, stop: asyncio.Event, crashes: int) -> None:
        self.stop, self.crashes, self.starts = stop, crashes, 0

    async def run(self) -> None:
        self.starts += 1
        if self.starts <= self.crashes:
            raise ConnectionError("nats: no responders")
        await self.stop.wait()


async def test_a_crashed_task_restarts_and_the_service_is_unready_until_it_is_stable(
    server: GrpcServer, health: health_pb2_grpc.HealthStub
) -> None:
    stop = asyncio.Event()
    flaky = Flaky(stop, crashes=2)
    tasks = BackgroundTasks(
        "test", {"consumer": flaky.run}, stop, on_health=server.set_serving, policy=FAST
    )
    tasks.start()
    await until(lambda: "consumer" in tasks.down)
    # Unready (the service's health), yet alive (the server's): no liveness restart.
    assert await status(health, SERVICE_NAME) == NOT_SERVING
    assert await status(health) == SERVING
    await until(lambda: flaky.starts == 3)
    assert await status(health, SERVICE_NAME) == NOT_SERVING  # restarted, not yet stable
    await until(lambda: not tasks.down)
    assert await status(health, SERVICE_NAME) == SERVING
    await tasks.stop(1.0)
    assert flaky.starts == 3


async def test_pauses_between_restarts_double_up_to_the_cap() -> None:
    policy = CrashPolicy(restart_pause_s=1.0, max_pause_s=30.0)
    assert [policy.pause_s(n) for n in (1, 2, 3, 5, 6, 100)] == [1, 2, 4, 16, 30, 30]


async def test_a_task_that_returns_before_stop_counts_as_a_crash() -> None:
    stop = asyncio.Event()
    starts = 0

    async def returns_at_once() -> None:
        nonlocal starts
        starts += 1
        if starts > 1:
            await stop.wait()

    tasks = BackgroundTasks("test", {"relay": returns_at_once}, stop, policy=FAST)
    tasks.start()
    await until(lambda: starts == 2)
    await tasks.stop(1.0)


async def test_a_task_that_keeps_crashing_stops_the_process_which_then_fails(
    server: GrpcServer, health: health_pb2_grpc.HealthStub
) -> None:
    stop = asyncio.Event()
    steady = Flaky(stop, crashes=0)
    broken = Flaky(stop, crashes=10**6)
    policy = CrashPolicy(restart_pause_s=0.02, max_pause_s=0.05, stable_s=1.0, give_up_after_s=0.3)
    tasks = BackgroundTasks(
        "test",
        {"sweeper": steady.run, "consumer": broken.run},
        stop,
        on_health=server.set_serving,
        policy=policy,
    )
    started = time.monotonic()
    tasks.start()
    await asyncio.wait_for(stop.wait(), timeout=5)
    assert time.monotonic() - started >= policy.give_up_after_s
    assert broken.starts > 3
    assert await status(health, SERVICE_NAME) == NOT_SERVING
    with pytest.raises(BackgroundTaskFailed, match="consumer"):
        await tasks.stop(1.0)


@pytest.mark.parametrize("crashes_first", [0, 1])
async def test_stop_cancels_a_task_stuck_past_the_grace(crashes_first: int) -> None:
    # Restarted after a crash, the task is awaited under the stability timer: cancelled too.
    stop = asyncio.Event()
    starts = 0
    cancelled = asyncio.Event()

    async def stuck() -> None:
        nonlocal starts
        starts += 1
        if starts <= crashes_first:
            raise ConnectionError("nats: no responders")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    tasks = BackgroundTasks("test", {"relay": stuck}, stop, policy=FAST)
    tasks.start()
    await until(lambda: starts == crashes_first + 1)
    await tasks.stop(0.1)
    assert cancelled.is_set()
