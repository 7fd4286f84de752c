"""`GrpcServer` over real sockets: health, reflection, graceful drain, metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from infra.config import ConfigError
from infra.grpc_server import DEFAULT_MAX_CONCURRENT_RPCS, GrpcServer, GrpcServerSettings
from infra.metrics import start_metrics_server
from tests.integration.infra.grpc_echo import (
    METRICS_SERVICE,
    SERVICE,
    bearer,
    echo_server,
    echo_token,
    echo_verifier,
    method,
    running,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
async def echo() -> AsyncIterator[GrpcServer]:
    async with running(echo_server(echo_verifier())) as server:
        yield server


@pytest.fixture(scope="module")
async def channel(echo: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{echo.bound_port}") as channel:
        yield channel


def token(role: str = "service", tenant_id: str | None = None) -> str:
    return echo_token(role, tenant_id)


async def check(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return reply.status


async def test_health_reports_server_and_each_service_serving_without_a_token(
    channel: grpc.aio.Channel,
) -> None:
    assert await check(channel, "") == SERVING
    assert await check(channel, SERVICE) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(channel, "no.such.v1.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_every_service_without_a_token(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=2)]
    names = {s.name for s in responses[0].list_services_response.service}
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


async def test_unknown_method_is_unimplemented(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(method("Nope"))(b"", metadata=bearer(token()), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_stop_turns_not_serving_then_drains_in_flight_calls() -> None:
    server = echo_server(echo_verifier())
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE)
        )
        assert (await watch.read()).status == SERVING
        in_flight = asyncio.ensure_future(
            channel.unary_unary(method("Slow"))(b"0.6", metadata=bearer(token()), timeout=5)
        )
        await asyncio.sleep(0.1)  # the slow call is now inside the servicer
        stopping = asyncio.ensure_future(server.stop(grace=5, unready_delay_s=0.3))

        assert (await watch.read()).status == NOT_SERVING
        watch.cancel()
        assert await check(channel, SERVICE) == NOT_SERVING  # still answering during the delay
        assert await check(channel, "") == NOT_SERVING

        assert await in_flight == b"done"
        await asyncio.wait_for(stopping, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(channel, "")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_unexpected_error_is_internal_without_its_text(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(method("Crash"))(b"", metadata=bearer(token()), timeout=2)
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error"
    failed = [record for record in caplog.records if record.getMessage() == "rpc.failed"]
    assert failed and failed[-1].exc_info is not None  # the operator still sees what broke


async def test_a_port_already_in_use_is_an_error(echo: GrpcServer) -> None:
    with pytest.raises(RuntimeError):
        GrpcServer(echo.bound_port, [SERVICE], host="127.0.0.1")


def handled(method_name: str, code: str) -> float:
    labels = {"service": METRICS_SERVICE, "method": method(method_name), "code": code}
    return REGISTRY.get_sample_value("snapsell_grpc_server_handled_total", labels) or 0.0


def observed(method_name: str) -> float:
    labels = {"service": METRICS_SERVICE, "method": method(method_name)}
    return REGISTRY.get_sample_value("snapsell_grpc_server_handling_seconds_count", labels) or 0.0


@pytest.mark.parametrize(
    ("method_name", "metadata", "code"),
    [
        ("WhoAmI", bearer(token()), "OK"),
        ("WhoAmI", (), "UNAUTHENTICATED"),
        ("OwnerOnly", bearer(token("staff", "t1")), "PERMISSION_DENIED"),
        ("NotFound", bearer(token()), "NOT_FOUND"),
        ("Crash", bearer(token()), "INTERNAL"),
    ],
)
async def test_every_call_is_counted_by_final_code_and_timed(
    channel: grpc.aio.Channel, method_name: str, metadata: tuple, code: str
) -> None:
    before, before_timed = handled(method_name, code), observed(method_name)
    try:
        await channel.unary_unary(method(method_name))(b"", metadata=metadata, timeout=2)
    except grpc.aio.AioRpcError as error:
        assert error.code().name == code
    assert handled(method_name, code) == before + 1
    assert observed(method_name) == before_timed + 1


async def test_streaming_calls_are_counted(channel: grpc.aio.Channel) -> None:
    before = handled("StreamGen", "OK")
    call = channel.unary_stream(method("StreamGen"))(
        b"", metadata=bearer(token("staff", "t1")), timeout=2
    )
    assert len([reply async for reply in call]) == 3
    assert handled("StreamGen", "OK") == before + 1


async def test_metrics_endpoint_serves_the_rpc_metrics(channel: grpc.aio.Channel) -> None:
    await channel.unary_unary(method("WhoAmI"))(b"", metadata=bearer(token()), timeout=2)
    metrics = start_metrics_server(0, host="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    finally:
        metrics.stop()
    text = body.decode()
    assert "snapsell_grpc_server_handled_total{" in text
    assert "snapsell_grpc_server_handling_seconds_bucket{" in text


def test_server_settings_default_to_reflection_on_and_a_concurrency_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GRPC_REFLECTION", raising=False)
    monkeypatch.delenv("GRPC_MAX_CONCURRENT_RPCS", raising=False)
    assert GrpcServerSettings.from_env() == GrpcServerSettings(
        reflection=True, max_concurrent_rpcs=DEFAULT_MAX_CONCURRENT_RPCS
    )
    monkeypatch.setenv("GRPC_REFLECTION", "false")
    monkeypatch.setenv("GRPC_MAX_CONCURRENT_RPCS", "50")
    assert GrpcServerSettings.from_env() == GrpcServerSettings(
        reflection=False, max_concurrent_rpcs=50
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [("GRPC_REFLECTION", "maybe"), ("GRPC_MAX_CONCURRENT_RPCS", "0")],
)
def test_malformed_server_settings_fail_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        GrpcServer(0, [SERVICE], host="127.0.0.1")
