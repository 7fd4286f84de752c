"""The gRPC server every service runs: grpc.aio with the standard health and reflection services.

Settings (environment, read when the server is built): `GRPC_REFLECTION` (default true; the
production overlay turns it off so the API is not listed to anyone who can reach a port) and
`GRPC_MAX_CONCURRENT_RPCS` (calls in progress at once; further calls are refused at once with
RESOURCE_EXHAUSTED instead of queueing without bound).

Lifecycle: `start()` marks every service SERVING; `stop(grace)` marks them NOT_SERVING first (so
health-checking clients and probes move away), then stops accepting calls and lets in-flight
calls finish within `grace` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from infra.config import env_bool, env_int

# Paths that never need a token: probes and tooling (grpcurl, grpc_health_probe) must work
# without credentials, and they reveal nothing tenant-specific.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Fail loudly when the port is taken instead of silently sharing it with another process.
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Accept client keepalive pings every 10 s or more (our clients ping every 30 s).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Recycle connections now and then so clients re-resolve and spread over new replicas.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
)

# Far above what a replica serves at once in the benchmarks (≤ 100 concurrent callers), low
# enough that a flood is refused before it exhausts memory and the database pool's wait queue.
DEFAULT_MAX_CONCURRENT_RPCS = 1000

Behavior = Callable[..., Any]


@dataclass(frozen=True)
class GrpcServerSettings:
    reflection: bool = True
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS

    @classmethod
    def from_env(cls) -> GrpcServerSettings:
        return cls(
            reflection=env_bool("GRPC_REFLECTION", True),
            max_concurrent_rpcs=env_int(
                "GRPC_MAX_CONCURRENT_RPCS",
                DEFAULT_MAX_CONCURRENT_RPCS,
                minimum=1,
                maximum=100_000,
            ),
        )


class GrpcServer:
    """A grpc.aio server with health (and reflection unless `settings.reflection` is off); add
    servicers to `.server` before `start()`. `settings` default to the environment's.

    Interceptors run in list order; the usual stack is
    `[*telemetry.grpc_server_interceptors(), RpcMetricsInterceptor(service), AuthInterceptor(...)]`
    (tracing outermost; metrics before auth so refused calls are counted too).
    """

    def __init__(
        self,
        port: int,
        service_full_names: Sequence[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        *,
        host: str = "0.0.0.0",
        options: Sequence[tuple[str, Any]] = SERVER_OPTIONS,
        settings: GrpcServerSettings | None = None,
    ) -> None:
        settings = settings if settings is not None else GrpcServerSettings.from_env()
        self._service_names = tuple(service_full_names)
        self.server: grpc.aio.Server = grpc.aio.server(
            interceptors=list(interceptors),
            options=list(options),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
        self.bound_port: int = self.server.add_insecure_port(f"{host}:{port}")
        self._stopped = False

    async def start(self) -> None:
        await self.server.start()
        await self._health.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        for name in self._service_names:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0, *, unready_delay_s: float = 0.0) -> None:
        """NOT_SERVING, wait `unready_delay_s` (time for probes to notice), then drain."""
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        if unready_delay_s > 0:
            await asyncio.sleep(unready_delay_s)
        await self.server.stop(grace)


def wrap_rpc_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior]
) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour is `wrap(behaviour)`, keeping its streaming shape."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            wrap(handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def aborting_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape that ends the call with `code` before the servicer runs."""

    async def abort(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return wrap_rpc_handler(handler, lambda _behavior: abort)
