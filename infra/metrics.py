"""Prometheus metrics: the `/metrics` HTTP endpoint and per-RPC counters and latency.

Metrics live in prometheus_client's default registry; each module declares its own next to
the behaviour it measures (e.g. `infra.auth.AUTH_DENIALS`).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from infra.config import env_bind_host
from infra.grpc_server import Behavior, WrappedHandlers

RPC_HANDLED = Counter(
    "snapsell_grpc_server_handled_total",
    "gRPC calls completed by the server, by final status code",
    ["service", "method", "code"],
)
RPC_HANDLING_SECONDS = Histogram(
    "snapsell_grpc_server_handling_seconds",
    "Time the server spent handling a gRPC call",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


@dataclass(frozen=True)
class MetricsServer:
    port: int
    stop: Callable[[], None]


def start_metrics_server(port: int, *, host: str | None = None) -> MetricsServer:
    """Serve `/metrics` on a background thread; `port=0` picks a free port (see `.port`); on
    `BIND_HOST` unless `host` is given."""
    httpd, thread = start_http_server(port, addr=host if host is not None else env_bind_host())

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return MetricsServer(port=httpd.server_port, stop=stop)


def _final_code(context: Any) -> str:
    code = context.code()
    return "OK" if code is None else code.name


class _MethodRecorder:
    """Label children resolved once per method: `.labels()` takes a lock and a dict lookup,
    which would otherwise be paid on every call."""

    __slots__ = ("_counters", "_histogram", "_method", "_service")

    def __init__(self, service: str, method: str) -> None:
        self._service, self._method = service, method
        self._histogram = RPC_HANDLING_SECONDS.labels(service, method)
        self._counters: dict[str, Any] = {}

    def record(self, started: float, code: str) -> None:
        self._histogram.observe(time.perf_counter() - started)
        counter = self._counters.get(code)
        if counter is None:
            counter = self._counters[code] = RPC_HANDLED.labels(self._service, self._method, code)
        counter.inc()


def _error_code(error: BaseException, context: Any) -> str:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    # context.abort() raises AbortError after setting the code; anything else is a servicer bug.
    code = context.code()
    return "UNKNOWN" if code is None else code.name


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts calls by final status code and observes their latency, per method.

    Put it before `AuthInterceptor` so it also counts the calls auth refuses."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._recorders: dict[str, _MethodRecorder] = {}
        self._timed = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:  # unknown method: no label for arbitrary client-chosen names
            return None
        method: str = handler_call_details.method
        return self._timed.get(method, handler, lambda: self._timing(method))

    def _timing(self, method: str) -> Callable[[Behavior], Behavior]:
        recorder = self._recorders.get(method)
        if recorder is None:
            recorder = self._recorders[method] = _MethodRecorder(self._service, method)
        return lambda behavior: _timed(behavior, recorder)


def _timed(behavior: Behavior, recorder: _MethodRecorder) -> Behavior:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as error:
                recorder.record(started, _error_code(error, context))
                raise
            recorder.record(started, _final_code(context))

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def call(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            try:
                response = await behavior(request, context)
            except BaseException as error:
                recorder.record(started, _error_code(error, context))
                raise
            recorder.record(started, _final_code(context))
            return response

        return call

    def sync_call(request: Any, context: Any) -> Any:
        started = time.perf_counter()
        try:
            response = behavior(request, context)
        except BaseException as error:
            recorder.record(started, _error_code(error, context))
            raise
        recorder.record(started, _final_code(context))
        return response

    return sync_call
