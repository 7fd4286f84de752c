"""`service_channel` against a real server: service tokens, deadlines, retry on UNAVAILABLE."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from infra import log
from infra.auth import ServiceTokenProvider
from infra.config import ConfigError
from infra.grpc_client import service_channel
from infra.grpc_server import GrpcServer
from tests.integration.infra.grpc_echo import (
    AUDIENCE,
    KEYS,
    bearer,
    echo_server,
    echo_verifier,
    free_port,
    method,
    running,
)


@pytest.fixture(scope="module")
async def echo() -> AsyncIterator[GrpcServer]:
    async with running(echo_server(echo_verifier())) as server:
        yield server


async def test_calls_carry_a_service_token_for_the_caller(echo: GrpcServer) -> None:
    provider = ServiceTokenProvider(KEYS.key("routing"), AUDIENCE)
    async with service_channel(f"127.0.0.1:{echo.bound_port}", token_provider=provider) as channel:
        body = json.loads(await channel.unary_unary(method("WhoAmI"))(b""))
    assert (body["sub"], body["role"], body["tenant_id"]) == ("routing", "service", None)


async def test_a_token_for_another_service_is_refused(echo: GrpcServer) -> None:
    provider = ServiceTokenProvider(KEYS.key("routing"), "outbox")
    async with service_channel(f"127.0.0.1:{echo.bound_port}", token_provider=provider) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(method("WhoAmI"))(b"")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_default_token_comes_from_the_environment_and_the_service_name(
    echo: GrpcServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log, "_service", "routing")
    monkeypatch.setenv(
        "SNAPSELL_SIGNING_KEY_FILE", KEYS.env("routing")["SNAPSELL_SIGNING_KEY_FILE"]
    )
    async with service_channel(f"127.0.0.1:{echo.bound_port}", audience=AUDIENCE) as channel:
        body = json.loads(await channel.unary_unary(method("WhoAmI"))(b""))
    assert (body["sub"], body["role"]) == (log.service_name(), "service")


def test_channel_without_a_signing_key_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SNAPSELL_SIGNING_KEY_FILE", raising=False)
    with pytest.raises(ConfigError, match="SNAPSELL_SIGNING_KEY_FILE"):
        service_channel("127.0.0.1:1", audience="outbox")


def test_a_signing_key_published_under_another_identity_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(log, "_service", "routing")
    monkeypatch.setenv(
        "SNAPSELL_SIGNING_KEY_FILE", KEYS.env("routing")["SNAPSELL_SIGNING_KEY_FILE"]
    )
    monkeypatch.setenv("SNAPSELL_SIGNING_KEY_ID", "outbox.2")
    with pytest.raises(ConfigError, match="does not name 'routing'"):
        service_channel("127.0.0.1:1", audience="outbox")


async def test_a_token_given_by_the_caller_is_kept(echo: GrpcServer) -> None:
    provider = ServiceTokenProvider(KEYS.key("gateway"), AUDIENCE)
    owner = KEYS.token("owner", "t1", "olga", audience=AUDIENCE)
    async with service_channel(f"127.0.0.1:{echo.bound_port}", token_provider=provider) as channel:
        body = json.loads(await channel.unary_unary(method("WhoAmI"))(b"", metadata=bearer(owner)))
    assert (body["sub"], body["role"]) == ("olga", "owner")


async def test_unary_calls_get_the_default_deadline(echo: GrpcServer) -> None:
    provider = ServiceTokenProvider(KEYS.key("routing"), AUDIENCE)
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
    provider = ServiceTokenProvider(KEYS.key("routing"), AUDIENCE)
    async with service_channel(
        f"127.0.0.1:{port}", token_provider=provider, options=options
    ) as channel:
        pending = asyncio.ensure_future(channel.unary_unary(method("WhoAmI"))(b""))
        await asyncio.sleep(0.3)
        async with running(echo_server(echo_verifier(), port=port)):
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
