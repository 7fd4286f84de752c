"""A small real gRPC service (raw-bytes messages, no generated code) behind `GrpcServer` with the
production interceptors, for the infra gRPC tests."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from infra.auth import HUMAN_ROLES, Access, AuthInterceptor, JwtVerifier, current_principal
from infra.grpc_server import GrpcServer
from infra.keys import KeySetFile
from infra.metrics import RpcMetricsInterceptor
from tools.dev_keys import IDENTITIES, DevKeys

SERVICE = "test.v1.EchoService"
METRICS_SERVICE = "echo-test"
# The audience echo servers accept, and the keys their callers sign with (`routing` is the
# service allowed in POLICY).
AUDIENCE = "echo"
_KEYS_DIR = Path(tempfile.mkdtemp(prefix="echo-keys-"))
atexit.register(shutil.rmtree, _KEYS_DIR, ignore_errors=True)
KEYS = DevKeys(_KEYS_DIR, (*IDENTITIES, "gateway"))


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


_ROUTING = frozenset({"routing"})
POLICY = {
    method("WhoAmI"): Access(roles=HUMAN_ROLES, services=_ROUTING),
    method("OwnerOnly"): Access(roles=frozenset({"owner", "admin"})),
    method("StreamGen"): Access(roles=frozenset({"staff", "owner"})),
    method("StreamWrite"): Access(roles=frozenset({"staff", "owner"})),
    method("Collect"): Access(services=_ROUTING),
    method("Slow"): Access(services=_ROUTING),
    method("NotFound"): Access(roles=HUMAN_ROLES, services=_ROUTING),
    method("Crash"): Access(roles=HUMAN_ROLES, services=_ROUTING),
    # "Unlisted" is served but deliberately absent: the interceptor must refuse it.
}


def echo_verifier() -> JwtVerifier:
    """A verifier of tokens for AUDIENCE that trusts KEYS."""
    trusted = KeySetFile(
        str(KEYS.trusted_keys_file), setting="echo keys", algorithms=frozenset({"ES256"})
    )
    return JwtVerifier(audience=AUDIENCE, trusted_keys=trusted)


def echo_token(role: str = "service", tenant_id: str | None = None, sub: str | None = None) -> str:
    """A token for the echo server: a `service` token is `sub`'s own (routing's by default),
    others the operator's."""
    who = sub or ("routing" if role == "service" else "tester")
    return KEYS.token(role, tenant_id, who, audience=AUDIENCE)


def _whoami(context: grpc.aio.ServicerContext) -> bytes:
    metadata = dict(context.invocation_metadata() or ())
    body = {
        **asdict(current_principal()),
        "previous_attempts": int(metadata.get("grpc-previous-rpc-attempts", 0)),
        "has_traceparent": "traceparent" in metadata,
    }
    return json.dumps(body).encode()


async def who_am_i(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(0.005)  # let concurrent calls interleave across awaits
    return _whoami(context)


async def stream_gen(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        await asyncio.sleep(0)
        yield _whoami(context)


async def stream_write(request: bytes, context: grpc.aio.ServicerContext) -> None:
    for _ in range(2):
        await context.write(_whoami(context))


async def collect(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    parts = [part async for part in requests]
    return b"|".join(parts) + b"|" + current_principal().sub.encode()


async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(float(request.decode()))
    return b"done"


async def not_found(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b""


async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("servicer bug")


def echo_handler() -> grpc.GenericRpcHandler:
    unary = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "WhoAmI": unary(who_am_i),
            "OwnerOnly": unary(who_am_i),
            "Unlisted": unary(who_am_i),
            "Slow": unary(slow),
            "NotFound": unary(not_found),
            "Crash": unary(crash),
            "StreamGen": grpc.unary_stream_rpc_method_handler(stream_gen),
            "StreamWrite": grpc.unary_stream_rpc_method_handler(stream_write),
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
        },
    )


def echo_server(
    verifier: JwtVerifier, *, port: int = 0, extra_interceptors: tuple[Any, ...] = ()
) -> GrpcServer:
    interceptors = [
        RpcMetricsInterceptor(METRICS_SERVICE),
        *extra_interceptors,
        AuthInterceptor(verifier, POLICY, service=METRICS_SERVICE),
    ]
    server = GrpcServer(port, [SERVICE], interceptors, host="127.0.0.1")
    server.server.add_generic_rpc_handlers([echo_handler()])
    return server


@contextlib.asynccontextmanager
async def running(server: GrpcServer) -> AsyncIterator[GrpcServer]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
