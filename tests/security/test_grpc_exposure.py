"""What a gRPC server shows and how much it accepts at once, as set by the environment the
production overlay gives every service: reflection off (the API is not listed to whoever
reaches a port), and a cap on calls in progress (a flood is refused, not queued)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.integration.infra.grpc_echo import (
    SERVICE,
    bearer,
    echo_server,
    echo_token,
    echo_verifier,
    method,
    running,
)


def token() -> str:
    return echo_token()


async def test_reflection_off_serves_no_reflection_service_but_keeps_health(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GRPC_REFLECTION", "false")
    async with running(echo_server(echo_verifier())) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=2)]
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_calls_past_the_concurrency_cap_are_refused_with_resource_exhausted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GRPC_MAX_CONCURRENT_RPCS", "2")
    async with running(echo_server(echo_verifier())) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
            slow = channel.unary_unary(method("Slow"))
            held = [
                asyncio.ensure_future(slow(b"0.8", metadata=bearer(token()), timeout=5))
                for _ in range(2)
            ]
            await asyncio.sleep(0.3)  # both calls are now inside the servicer
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await slow(b"0", metadata=bearer(token()), timeout=2)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await asyncio.gather(*held) == [b"done", b"done"]
            # Room again once they finished.
            assert await slow(b"0", metadata=bearer(token()), timeout=2) == b"done"
