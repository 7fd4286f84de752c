"""The gRPC server every service runs: grpc.aio with the standard health and reflection services.

Settings (environment, read when the server is built): `GRPC_REFLECTION` (default true; the
production overlay turns it off so the API is not listed to anyone who can reach a port) and
`GRPC_MAX_CONCURRENT_RPCS` (calls in progress at once; further calls are refused at once with
RESOURCE_EXHAUSTED instead of queueing without bound).

Lifecycle: `start()` marks the server ("", the liveness probe's) and every service (the
readiness probe's) SERVING; `set_serving(False)` marks the services NOT_SERVING while the process
cannot do its work (a background task down); `stop(grace)` marks all NOT_SERVING first (so
health-checking clients and probes move away), then stops accepting calls and lets in-flight
calls finish within `grace` seconds.

Errors: each service has one table from its error types to status codes (`ERROR_STATUS` in its
api.py) and decorates its RPC methods with `map_errors(ERROR_STATUS)`. The table is looked up
along the error's class hierarchy, the service's entries before the common ones:
- `InvalidInputError` (e.g. a forged page token) -> INVALID_ARGUMENT with its one-line message;
- the database unavailable (`infra.db.DATABASE_UNAVAILABLE`) -> UNAVAILABLE "database
  unavailable, retry"; a serialization failure or deadlock -> ABORTED "concurrent update, retry";
  both logged as warnings, the caller may retry;
- an entry `Error: code` answers with the error's one-line message; `Error: (code, text)` with
  that fixed text.
What no table maps is handled once for every server by `RpcErrorInterceptor` (always the
innermost interceptor):
- a request with a NUL character in any text field -> INVALID_ARGUMENT before the servicer runs
  (PostgreSQL cannot store NUL in text);
- the common entries above, for methods that are not decorated;
- any other exception -> INTERNAL "internal error", logged with the exception; the caller never
  sees its text (a driver message, a stack trace, SQL).
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from infra.config import env_bind_host, env_bool, env_int
from infra.db import DATABASE_UNAVAILABLE
from infra.log import get_logger

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

NUL_IN_TEXT = "text fields must not contain NUL characters"
INTERNAL_ERROR = "internal error"
DATABASE_UNAVAILABLE_TEXT = "database unavailable, retry"
CONCURRENT_UPDATE_TEXT = "concurrent update, retry"

_log = get_logger(__name__)


class InvalidInputError(ValueError):
    """Client input no RPC can take, whichever service: returned as INVALID_ARGUMENT with this
    one-line message by `RpcErrorInterceptor`, unless the servicer maps it itself."""


# An error type -> its status code (the caller gets the error's message) or (code, fixed text).
ErrorStatus = Mapping[type[Exception], grpc.StatusCode | tuple[grpc.StatusCode, str]]

COMMON_ERROR_STATUS: ErrorStatus = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    asyncpg.TransactionRollbackError: (grpc.StatusCode.ABORTED, CONCURRENT_UPDATE_TEXT),
    **{
        error: (grpc.StatusCode.UNAVAILABLE, DATABASE_UNAVAILABLE_TEXT)
        for error in DATABASE_UNAVAILABLE
    },
}

Request = TypeVar("Request")
Response = TypeVar("Response")
Method = Callable[[Any, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]]


def map_errors(
    error_status: ErrorStatus,
) -> Callable[[Method[Request, Response]], Method[Request, Response]]:
    """The decorator of a service's RPC methods: its errors to status codes by `error_status`,
    then `COMMON_ERROR_STATUS` (see the module docstring)."""
    table = {**COMMON_ERROR_STATUS, **error_status}
    mapped = tuple(table)

    def decorate(method: Method[Request, Response]) -> Method[Request, Response]:
        @functools.wraps(method)
        async def call(
            self: Any, request: Request, context: grpc.aio.ServicerContext[Request, Response]
        ) -> Response:
            try:
                return await method(self, request, context)
            except mapped as error:
                await _abort_with_status(error, table, context, method.__name__)
            raise AssertionError("unreachable: context.abort raises")

        return call

    return decorate


def _status_for(error: Exception, table: ErrorStatus) -> tuple[grpc.StatusCode, str | None] | None:
    """The code and fixed text (None: the error's message) of the nearest class of `error`."""
    for kind in type(error).__mro__:
        status = table.get(kind)
        if status is not None:
            return status if isinstance(status, tuple) else (status, None)
    return None


async def _abort_with_status(
    error: Exception, table: ErrorStatus, context: grpc.aio.ServicerContext[Any, Any], method: str
) -> None:
    status = _status_for(error, table)
    assert status is not None
    code, text = status
    if text is not None:
        _log.warning(
            "rpc.refused",
            extra={"fields": {"method": method, "code": code.name, "error": str(error)}},
        )
        await context.abort(code, text)
    # A lookup error's str() is its repr: take the message itself.
    await context.abort(code, str(error.args[0]) if len(error.args) == 1 else str(error))


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
    (tracing outermost; metrics before auth so refused calls are counted too). The server adds
    `RpcErrorInterceptor` after them, next to the servicer.
    """

    def __init__(
        self,
        port: int,
        service_full_names: Sequence[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        *,
        host: str | None = None,
        options: Sequence[tuple[str, Any]] = SERVER_OPTIONS,
        settings: GrpcServerSettings | None = None,
    ) -> None:
        settings = settings if settings is not None else GrpcServerSettings.from_env()
        self._service_names = tuple(service_full_names)
        self.server: grpc.aio.Server = grpc.aio.server(
            interceptors=[*interceptors, RpcErrorInterceptor()],
            options=list(options),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
        host = host if host is not None else env_bind_host()
        self.bound_port: int = self.server.add_insecure_port(f"{host}:{port}")
        self._stopped = False

    async def start(self) -> None:
        await self.server.start()
        await self._health.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        """Readiness: the health of each of the server's services, SERVING or NOT_SERVING (e.g.
        while a background task is down, see `infra.supervisor`). The overall health ("") is
        liveness and stays SERVING until `stop`. No effect once stopping."""
        if self._stopped:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._service_names:
            await self._health.set(name, status)

    async def stop(self, grace: float = 5.0, *, unready_delay_s: float = 0.0) -> None:
        """NOT_SERVING, wait `unready_delay_s` (time for probes to notice), then drain."""
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        if unready_delay_s > 0:
            await asyncio.sleep(unready_delay_s)
        await self.server.stop(grace)


# A handler's (request_streaming, response_streaming) -> its behaviour's attribute and builder.
_HANDLER_SHAPES: Mapping[tuple[bool, bool], tuple[str, Callable[..., Any]]] = {
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
}


def wrap_rpc_handler(
    handler: grpc.RpcMethodHandler[Any, Any], wrap: Callable[[Behavior], Behavior]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of `handler` whose behaviour is `wrap(behaviour)`, keeping its streaming shape.

    grpc sets exactly the behaviour that matches the handler's shape; the others are None."""
    attribute, build = _HANDLER_SHAPES[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attribute)
    assert behavior is not None
    copy: grpc.RpcMethodHandler[Any, Any] = build(
        wrap(behavior),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return copy


class WrappedHandlers:
    """Per method, the wrapped copy of a servicer's handler, built once: an interceptor sees
    the same handler object on every call of a method."""

    def __init__(self) -> None:
        # method -> (handler as registered, its wrapped copy)
        self._copies: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    def get(
        self,
        method: str,
        handler: grpc.RpcMethodHandler[Any, Any],
        wrap: Callable[[], Callable[[Behavior], Behavior]],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The copy of `handler` wrapped by `wrap()` (called only when it is built)."""
        cached = self._copies.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        copy = wrap_rpc_handler(handler, wrap())
        self._copies[method] = (handler, copy)
        return copy


def aborting_handler(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape that ends the call with `code` before the servicer runs."""

    async def abort(request_or_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, details)

    return wrap_rpc_handler(handler, lambda _behavior: abort)


class _Kind(enum.Enum):
    TEXT, TEXTS, MESSAGE, MESSAGES, MAP = range(5)


def has_nul_text(message: Message) -> bool:
    """Whether any string field of `message`, nested messages and maps included, contains NUL.

    NUL is encoded as a zero byte, so a serialized message without one has none: that test (in
    C, ~40 µs for a 1000-check batch) spares the walk of the fields (~4 ms for that batch)."""
    return b"\0" in message.SerializeToString() and _walk_has_nul(message)


def _walk_has_nul(message: Message) -> bool:
    for name, kind in _text_fields(message.DESCRIPTOR):
        value = getattr(message, name)
        if kind is _Kind.TEXT:
            if "\0" in value:
                return True
        elif kind is _Kind.TEXTS:
            if any("\0" in text for text in value):
                return True
        elif kind is _Kind.MESSAGE:
            if message.HasField(name) and _walk_has_nul(value):
                return True
        elif kind is _Kind.MESSAGES:
            if any(_walk_has_nul(nested) for nested in value):
                return True
        elif any(_item_has_nul(key) for key in value) or any(
            _item_has_nul(item) for item in value.values()
        ):  # a map
            return True
    return False


def _item_has_nul(item: object) -> bool:
    if isinstance(item, str):
        return "\0" in item
    return isinstance(item, Message) and _walk_has_nul(item)


@functools.cache
def _text_fields(descriptor: Descriptor) -> tuple[tuple[str, _Kind], ...]:
    """The fields of a message type that hold text, directly or nested: computed once per type,
    so a request is checked by reading only those fields."""
    fields: list[tuple[str, _Kind]] = []
    for field in descriptor.fields:
        message_type = field.message_type  # set for every message field, None for the others
        if field.type == FieldDescriptor.TYPE_STRING:
            fields.append((field.name, _Kind.TEXTS if field.is_repeated else _Kind.TEXT))
        elif (
            field.type != FieldDescriptor.TYPE_MESSAGE
            or message_type is None
            or not _holds_text(message_type)
        ):
            continue
        elif message_type.GetOptions().map_entry:
            fields.append((field.name, _Kind.MAP))
        else:
            fields.append((field.name, _Kind.MESSAGES if field.is_repeated else _Kind.MESSAGE))
    return tuple(fields)


def _holds_text(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    if descriptor.full_name in seen:  # a recursive type: its text fields are counted once
        return False
    seen = seen | {descriptor.full_name}
    return any(
        field.type == FieldDescriptor.TYPE_STRING
        or (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and field.message_type is not None
            and _holds_text(field.message_type, seen)
        )
        for field in descriptor.fields
    )


class RpcErrorInterceptor(grpc.aio.ServerInterceptor):
    """The last word on errors for unary calls (every RPC of our contracts): see the module
    docstring. Streaming handlers (health's Watch, reflection) pass through unchanged."""

    def __init__(self) -> None:
        self._guarded = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        method: str = handler_call_details.method
        return self._guarded.get(
            method, handler, lambda: lambda behavior: _guarded(behavior, method)
        )


def _guarded(behavior: Behavior, method: str) -> Behavior:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Message) and has_nul_text(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NUL_IN_TEXT)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the servicer chose its status
        except Exception as error:
            if _status_for(error, COMMON_ERROR_STATUS) is not None:
                await _abort_with_status(error, COMMON_ERROR_STATUS, context, method)
            _log.exception(
                "rpc.failed",
                extra={"fields": {"method": method, "error_type": type(error).__name__}},
            )
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR)

    return call
