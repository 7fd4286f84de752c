"""`service_channel` against a real server: service tokens, deadlines, retry on UNAVAILABLE."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from infra import log
from infra.auth import JwtVerifier, ServiceTokenProvider, issue_token
from infra.config import ConfigError
from infra.grpc_client import service_channel
from infra.grpc_server import GrpcServer
from tests.integration.grpc_echo import bearer, echo_server, free_port, method, running

SECRET = "grpc-client-test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
async def echo() -> AsyncIterator[GrpcServer]:
    async with running(echo_server(JwtVerifier(secret=SECRET))) as server:
        yield server


async def test_calls_carry_a_service_token_for_the_caller(echo: GrpcServer) -> None:
    provider = ServiceTokenProvider(SECRET, "routing")
    async with service_channel(f"127.0.0.1:{echo.bound_port}", token_provider=provider) as channel:
        body = json.loads(await channel.unary_unary(method("WhoAmI"))(b""))
    assert (body["sub"], body["role"], body["tenant_id"]) == ("routing", "service", None)


async def test_default_token_comes_from_the_environment_and_the_service_name(
    echo: GrpcServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAPSELL_JWT_SECRET", SECRET)
    async with service_channel(f"127.0.0.1:{echo.bound_port}") as channel:
        body = json.loads(await channel.unary_unary(method("WhoAmI"))(b""))
    assert (body["sub"], body["role"]) == (log.service_name(), "service")


def test_channel_without_a_secret_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SNAPSELL_JWT_SECRET", raising=False)
    with pytest.raises(ConfigError, match="SNAPSELL_JWT_SECRET"):
        service_channel("127.0.0.1:1")


async def test_a_token_given_by_the_caller_is_kept(echo: GrpcServer) -> None:
    provider = ServiceTokenProvider(SECRET, "gateway")
    owner = issue_token(SECRET, sub="olga", role="owner", tenant_id="t1")
    async with service_channel(f"127.0.0.1:{echo.bound_port}", token_provider=provider) as channel:
        body = json.loads(await channel.unary_unary(method("WhoAmI"))(b"", metadata=bearer(owner)))
    assert (body["sub"], body["role"]) == ("olga", "owner")


async def test_unary_calls_get_the_default_deadline(echo: GrpcServer) -> None:
    provider = ServiceTokenProvider(SECRET, "routing")
    address = f"127.0.0.1:{echo.bound_port}"
    async with service_channel(address, token_provider=provider, default_timeout_s=0.2) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(method("Slow"))(b"3")
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2


async def call_while_server_starts_late(options: tuple = ()) -> bytes:
    """Call a port with nothing behind it; a server comes up there 0.3 s later."""
    port = free_port()
    provider = ServiceTokenProvider(SECRET, "routing")
    async with service_channel(
        f"127.0.0.1:{port}", token_provider=provider, options=options
    ) as channel:
        pending = asyncio.ensure_future(channel.unary_unary(method("WhoAmI"))(b""))
        await asyncio.sleep(0.3)
        async with running(echo_server(JwtVerifier(secret=SECRET), port=port)):
            return await pending


async def test_call_is_retried_while_the_peer_is_unavailable() -> None:
    body = json.loads(await call_while_server_starts_late())
    assert body["role"] == "service"
    assert body["previous_attempts"] >= 1  # the server saw a retried attempt, not the first


async def test_without_retries_the_same_call_fails_unavailable() -> None:
    # Proves the test above depends on the retry policy, not on luck or on connection queuing.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_while_server_starts_late(options=(("grpc.enable_retries", 0),))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
