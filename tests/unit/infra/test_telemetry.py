"""The JSON-lines span file and W3C propagation through message headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from infra import telemetry
from infra.telemetry import (
    JsonLinesSpanExporter,
    extract,
    grpc_client_interceptors,
    grpc_server_interceptors,
    inject,
    tracing_enabled,
)


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
