"""OpenTelemetry tracing: provider set-up, gRPC instrumentation and W3C propagation.

Spans are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, with the protocol the
standard `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL` names: `grpc` (the
default) or `http/protobuf` (requests instead of a second gRPC stack: the gateway, which has no
other use for grpc, saves ~10 MB resident per process). The exporter reads the other standard
`OTEL_EXPORTER_OTLP_*` variables itself. Spans are also appended as JSON lines to
`SNAPSELL_TRACE_FILE` when that is set (tests follow a message across processes with it).
Either way phone numbers are masked first (`infra.log.mask_phone`) in every span's name,
attributes, events and status: an exception recorded on a span carries its message and
traceback, which may quote a number.
With neither, the API's no-op provider stays in place and no interceptor is installed.

When on, asyncpg queries are spans too, inside the trace of the work that runs them. A query
with no parent span (a poll, a sweep, the event relay) is not recorded: every background loop
would otherwise start a one-span trace each second. Of the other traces, the share
`SNAPSELL_TRACE_SAMPLE_RATIO` (0 to 1, default 1: all) is recorded, chosen by trace id, and
the services a trace reaches follow the decision its first one made (production sets 0.1:
deploy/base). `OTEL_TRACES_SAMPLER`, when set, replaces these rules with the SDK's standard
samplers.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Status
from opentelemetry.util.types import Attributes

from infra.config import env_choice, env_float, env_optional
from infra.log import mask_phone

if TYPE_CHECKING:  # a process without tracing and gRPC (the gateway) need not load grpc (~8 MB)
    import grpc

_provider: TracerProvider | None = None


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file shared by several processes.

    Each export is a single O_APPEND write, so lines from different processes do not interleave.
    """

    def __init__(self, path: str, service: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._service = service
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(self._record(s), default=str) + "\n" for s in spans).encode()
        with self._lock:
            if self._fd < 0:
                return SpanExportResult.FAILURE
            os.write(self._fd, data)
        return SpanExportResult.SUCCESS

    def _record(self, span: ReadableSpan) -> dict[str, Any]:
        span_context = span.get_span_context()
        return {
            "trace_id": format(span_context.trace_id, "032x") if span_context else None,
            "span_id": format(span_context.span_id, "016x") if span_context else None,
            "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
            "name": span.name,
            "service": self._service,
            "kind": span.kind.name,
            "status": span.status.status_code.name,
            "status_description": span.status.description,
            "start": span.start_time,
            "end": span.end_time,
            "attributes": dict(span.attributes or {}),
            "events": [
                {"name": event.name, "attributes": dict(event.attributes or {})}
                for event in span.events
            ],
            "links": [
                {
                    "trace_id": format(link.context.trace_id, "032x"),
                    "span_id": format(link.context.span_id, "016x"),
                }
                for link in span.links
            ],
        }

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _masked_attributes(attributes: Attributes) -> Attributes:
    if not attributes:
        return attributes
    masked: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, str):
            value = mask_phone(value)
        elif isinstance(value, tuple | list) and any(isinstance(v, str) for v in value):
            value = tuple(mask_phone(v) if isinstance(v, str) else v for v in value)
        masked[mask_phone(key)] = value
    return masked


def masked_span(span: ReadableSpan) -> ReadableSpan:
    """A copy of `span` with phone numbers masked in its name, attributes, events (an
    exception's message and traceback) and status description."""
    status = span.status
    if status.description:
        status = Status(status.status_code, mask_phone(status.description))
    return ReadableSpan(
        name=mask_phone(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=_masked_attributes(span.attributes),
        events=tuple(
            Event(mask_phone(event.name), _masked_attributes(event.attributes), event.timestamp)
            for event in span.events
        ),
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class PhoneMaskingSpanExporter(SpanExporter):
    """Hands `exporter` each span with its phone numbers masked (`masked_span`)."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export([masked_span(span) for span in spans])

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


_DB_SYSTEM_KEYS = ("db.system", "db.system.name")  # older and current semantic conventions


class NoRootQuerySpans(Sampler):
    """Root sampler: drops database spans that have no parent; records `ratio` of the other
    traces (by trace id)."""

    def __init__(self, ratio: float = 1.0) -> None:
        self._others = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if kind is SpanKind.CLIENT and attributes and any(k in attributes for k in _DB_SYSTEM_KEYS):
            return SamplingResult(Decision.DROP)
        return self._others.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"NoRootQuerySpans({self._others.rate})"


OTLP_PROTOCOLS = ("grpc", "http/protobuf")  # http/json: no exporter in the Python SDK


def otlp_traces_protocol() -> str:
    """`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` when set, else `OTEL_EXPORTER_OTLP_PROTOCOL`, else
    grpc; another value is a configuration error."""
    traces = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    name = traces if env_optional(traces) else "OTEL_EXPORTER_OTLP_PROTOCOL"
    return env_choice(name, "grpc", OTLP_PROTOCOLS)


def otlp_span_exporter() -> SpanExporter:
    """The OTLP exporter of the configured protocol. Only its module is imported: the gRPC one
    pulls in grpcio and its protobufs, the HTTP one requests."""
    if otlp_traces_protocol() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()


def setup_tracing(service: str, *, database: bool = True) -> TracerProvider | None:
    """Install the SDK provider if an exporter is configured; idempotent. Returns the provider
    (call `.shutdown()` at exit to flush) or None when tracing is off. `database`: the process
    runs asyncpg queries, to be traced (without one, asyncpg and its instrumentation, ~5 MB
    resident, are not loaded)."""
    global _provider
    if _provider is not None:
        return _provider
    endpoint = env_optional("OTEL_EXPORTER_OTLP_ENDPOINT")
    trace_file = env_optional("SNAPSELL_TRACE_FILE")
    if not endpoint and not trace_file:
        return None
    ratio = env_float("SNAPSELL_TRACE_SAMPLE_RATIO", 1.0, minimum=0.0, maximum=1.0)
    exporter = otlp_span_exporter() if endpoint else None
    sampler = None if env_optional("OTEL_TRACES_SAMPLER") else ParentBased(NoRootQuerySpans(ratio))
    provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=sampler)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(PhoneMaskingSpanExporter(exporter)))
    if trace_file:
        # Synchronous, so a test can read a span as soon as the operation returns.
        file_exporter = PhoneMaskingSpanExporter(JsonLinesSpanExporter(trace_file, service))
        provider.add_span_processor(SimpleSpanProcessor(file_exporter))
    trace.set_tracer_provider(provider)
    if database:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().instrument(tracer_provider=provider)
    _provider = provider
    return provider


def tracing_enabled() -> bool:
    return _provider is not None


def grpc_server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Server spans (health checks excluded: probes would drown the traces); [] when off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.negate(filters.health_check()))]


def grpc_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client spans plus `traceparent` in the call metadata; [] when off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def inject(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent` (and `tracestate`) for the current span to message headers; nothing
    when there is no span (a process without tracing, outside any trace)."""
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)


def extract(headers: Mapping[str, str] | None) -> context.Context:
    """The remote span context carried by message headers (empty context when none)."""
    return propagate.extract(headers or {})
