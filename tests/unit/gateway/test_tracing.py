"""The traced gateway app: one server span per request, named after its route."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.gateway.api import create_app
from services.gateway.config import Config


def _config() -> Config:
    return Config(
        http_port=0,
        nats_url="nats://127.0.0.1:4222",
        public_base_url="https://hooks.example.test",
        default_auth_token="token",
        auth_tokens={},
        publish_timeout_s=1.0,
        max_body_bytes=16_384,
        signature_failures_per_window=100,
        signature_failure_window_s=60.0,
        sender_messages_per_minute=60,
        workers=1,
        status_max_body_bytes=16_384,
        status_signature_failures_per_window=100,
        forwarded_allow_ips=(),
        body_read_timeout_s=5.0,
        max_connections=100,
    )


async def _publish(subject: str, data: bytes, msg_id: str) -> None:
    raise AssertionError("an unsigned webhook is never published")


async def _ready() -> bool:
    return True


async def test_one_server_span_per_request_named_after_its_route_and_none_for_probes() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(_config(), _publish, _ready, traced=True, tracer_provider=provider)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://hooks.example.test"
    ) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        webhook = await client.post("/webhooks/twilio/messages", data={"Body": "A12"})
        assert webhook.status_code == 403  # unsigned
        assert (await client.post("/made-up/path/123456")).status_code == 404
    spans = exporter.get_finished_spans()
    assert [(span.name, span.kind) for span in spans] == [
        ("POST /webhooks/twilio/messages", SpanKind.SERVER),
        ("POST", SpanKind.SERVER),  # never named after a path a caller made up
    ]
    assert spans[0].attributes is not None
    assert spans[0].attributes["http.route"] == "/webhooks/twilio/messages"
