"""The JSON-lines span file, the OTLP protocol choice and W3C propagation through message
headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased

from infra import telemetry
from infra.config import ConfigError
from infra.telemetry import (
    JsonLinesSpanExporter,
    NoRootQuerySpans,
    extract,
    grpc_client_interceptors,
    grpc_server_interceptors,
    inject,
    otlp_span_exporter,
    setup_tracing,
    tracing_enabled,
)

PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"


def test_span_file_has_one_json_line_per_span_with_parent_links(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(str(path), "routing")))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("consume", attributes={"messaging.system": "nats"}):
        with tracer.start_as_current_span("store"):
            pass
    provider.shutdown()

    child, parent = (json.loads(line) for line in path.read_text().splitlines())
    assert (parent["name"], child["name"]) == ("consume", "store")
    assert child["trace_id"] == parent["trace_id"] and len(parent["trace_id"]) == 32
    assert child["parent_id"] == parent["span_id"] and parent["parent_id"] is None
    assert parent["service"] == "routing"
    assert parent["attributes"] == {"messaging.system": "nats"}
    assert parent["start"] <= child["start"] <= child["end"] <= parent["end"]


def test_headers_carry_the_trace_context_across_a_hop() -> None:
    tracer = TracerProvider().get_tracer("test")
    headers: dict[str, str] = {}
    with tracer.start_as_current_span("publish") as span:
        inject(headers)
    sent = span.get_span_context()
    assert headers["traceparent"].startswith(f"00-{sent.trace_id:032x}-{sent.span_id:016x}-")

    received = trace.get_current_span(extract(headers)).get_span_context()
    assert (received.trace_id, received.span_id, received.is_remote) == (
        sent.trace_id,
        sent.span_id,
        True,
    )


def test_missing_headers_give_an_empty_context() -> None:
    assert not trace.get_current_span(extract(None)).get_span_context().is_valid
    assert not trace.get_current_span(extract({})).get_span_context().is_valid


def test_no_interceptors_when_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_provider", None)
    assert not tracing_enabled()
    assert grpc_server_interceptors() == [] and grpc_client_interceptors() == []


@pytest.mark.parametrize(
    ("protocol", "traces_protocol", "exporter_class"),
    [
        (None, None, GrpcSpanExporter),  # the default, as before the variables were read
        ("grpc", None, GrpcSpanExporter),
        ("http/protobuf", None, HttpSpanExporter),
        (" HTTP/Protobuf ", None, HttpSpanExporter),
        ("grpc", "http/protobuf", HttpSpanExporter),  # the traces-only variable wins
        ("http/protobuf", "grpc", GrpcSpanExporter),
        (None, "http/protobuf", HttpSpanExporter),
    ],
)
def test_the_otlp_exporter_follows_the_standard_protocol_variables(
    monkeypatch: pytest.MonkeyPatch,
    protocol: str | None,
    traces_protocol: str | None,
    exporter_class: type,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    for name, value in ((PROTOCOL, protocol), (TRACES_PROTOCOL, traces_protocol)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    exporter = otlp_span_exporter()
    try:
        assert type(exporter) is exporter_class
    finally:
        exporter.shutdown()


@pytest.mark.parametrize(
    ("name", "value"),
    [(PROTOCOL, "http/json"), (PROTOCOL, "http"), (TRACES_PROTOCOL, "grpcs")],
)
def test_an_unknown_otlp_protocol_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setattr(telemetry, "_provider", None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.delenv(PROTOCOL, raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        setup_tracing("gateway", database=False)
    assert str(refused.value) == f"{name} must be one of grpc, http/protobuf, got {value!r}"
    assert not tracing_enabled()


@pytest.mark.parametrize("ratio", [0.0, 0.1, 1.0])
def test_a_share_of_traces_is_recorded_and_their_children_follow_while_root_queries_never_are(
    tmp_path: Path, ratio: float
) -> None:
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider(
        sampler=ParentBased(NoRootQuerySpans(ratio)), id_generator=RandomIdGenerator()
    )
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(str(path), "routing")))
    tracer = provider.get_tracer("test")
    for _ in range(2000):
        with tracer.start_as_current_span("route"):
            with tracer.start_as_current_span("query", kind=trace.SpanKind.CLIENT):
                pass
        with tracer.start_as_current_span(
            "poll", kind=trace.SpanKind.CLIENT, attributes={"db.system": "postgresql"}
        ):
            pass
    provider.shutdown()
    spans = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    roots = [s for s in spans if s["name"] == "route"]
    assert not [s for s in spans if s["name"] == "poll"]
    assert len([s for s in spans if s["name"] == "query"]) == len(roots)  # children follow
    assert abs(len(roots) - 2000 * ratio) <= 2000 * 0.03
