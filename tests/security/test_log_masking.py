"""Phone numbers never reach logs or exported spans, whatever form they take: international
with "00", national with or without separators, a WhatsApp WaId (digits without "+"), an
`sms:` / `whatsapp:` address, a Messenger ID. Masking them must leave the identifiers that
logs are read for (MessageSids, trace ids, timestamps, ports, counts) as they were."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infra import telemetry
from infra.log import JsonLineFormatter

ROOT = Path(__file__).resolve().parents[2]

# (as written, as it must appear in a log line)
PHONE_FORMS = [
    pytest.param("0033612345678", "0033******78", id="international-00"),
    pytest.param("0033 6 12 34 56 78", "0033******78", id="international-00-grouped"),
    pytest.param("06 12 34 56 78", "06******78", id="national-spaces"),
    pytest.param("06.12.34.56.78", "06******78", id="national-dots"),
    pytest.param("0612345678", "06******78", id="national-bare"),
    pytest.param("(415) 555-0123", "41******23", id="national-us"),
    pytest.param("whatsapp:33612345678", "whatsapp:33******78", id="whatsapp-waid"),
    pytest.param("sms:0612345678", "sms:06******78", id="sms-national"),
    pytest.param("33612345678", "33******78", id="waid"),
    pytest.param("14155238886", "14******86", id="waid-us"),
    pytest.param("messenger:1234567890123456", "messenger:12******56", id="messenger"),
]


def formatted(record: logging.LogRecord) -> str:
    line = JsonLineFormatter("routing").format(record)
    json.loads(line)  # still one JSON object
    return line


def make_record(message: str, *args: object, fields: dict | None = None) -> logging.LogRecord:
    record = logging.LogRecord("security.test", logging.INFO, __file__, 1, message, args, None)
    if fields is not None:
        record.fields = fields
    return record


@pytest.mark.parametrize(("raw", "masked"), PHONE_FORMS)
def test_phone_is_masked_in_the_log_message(raw: str, masked: str) -> None:
    line = formatted(make_record("reply.sent to %s", raw))
    assert raw not in line
    assert json.loads(line)["event"] == f"reply.sent to {masked}"


@pytest.mark.parametrize(("raw", "masked"), PHONE_FORMS)
def test_phone_is_masked_in_field_names_and_nested_values(raw: str, masked: str) -> None:
    fields = {"to": raw, raw: "seen", "peers": {"list": [f"from {raw}"]}}
    line = formatted(make_record("reply.sent", fields=fields))
    assert raw not in line
    logged = json.loads(line)
    assert (logged["to"], logged[masked]) == (masked, "seen")
    assert logged["peers"] == {"list": [f"from {masked}"]}


@pytest.mark.parametrize(("raw", "masked"), PHONE_FORMS)
def test_phone_is_masked_in_a_logged_exception(raw: str, masked: str) -> None:
    try:
        raise ValueError(f"cannot reach {raw}\n{raw}")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "send.failed", (), None)
        record.exc_info = sys.exc_info()
    line = formatted(record)
    assert raw not in line
    assert f"ValueError: cannot reach {masked}\n{masked}" in json.loads(line)["exception"]


# Each identifier sits next to a phone number: the number goes, the identifier stays.
NOT_PHONES = [
    pytest.param("SM0123456789abcdef0123456789abcdef", id="message-sid"),
    pytest.param("SM12345678901234567890123456789012", id="message-sid-all-digits"),
    pytest.param("MM33612345678aaaaaaaaaaaaaaaaaaaaa", id="media-sid-with-a-waid-inside"),
    pytest.param("4bf92f3577b34da6a3ce929d0e0e4736", id="trace-id"),
    pytest.param("00000000000000000000000012345678", id="trace-id-mostly-digits"),
    pytest.param("123e4567-e89b-12d3-a456-426614174000", id="uuid"),
    pytest.param("2026-12-07T16:23:15.123Z", id="iso-timestamp"),
    pytest.param("2026-12-07 16:23:15", id="timestamp-with-space"),
    pytest.param("1796660595", id="epoch-seconds"),
    pytest.param("1796660595123", id="epoch-ms"),
    pytest.param("1796660595123456789", id="epoch-ns"),
    pytest.param("127.0.0.1:50051", id="address-and-port"),
    pytest.param("192.168.100.200", id="ipv4"),
    pytest.param("12345678", id="count"),
    pytest.param("1 2 3 4 5 6 7 8 9 10", id="small-counts"),
    pytest.param("3.14159265358", id="decimal"),
]


@pytest.mark.parametrize("identifier", NOT_PHONES)
def test_identifiers_next_to_a_phone_number_are_left_as_they_are(identifier: str) -> None:
    message = f"{identifier} 33612345678 {identifier}"
    line = formatted(make_record("%s", message, fields={"id": identifier, "n": [identifier]}))
    logged = json.loads(line)
    assert logged["event"] == f"{identifier} 33******78 {identifier}"
    assert (logged["id"], logged["n"]) == (identifier, [identifier])


def test_exception_recorded_on_a_span_is_masked_before_export() -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(telemetry.PhoneMaskingSpanExporter(exported)))
    tracer = provider.get_tracer("test")
    text = "no route to 0033612345678, whatsapp:33612345678, +33612345678 or 06 12 34 56 78"
    with (
        pytest.raises(ValueError),
        tracer.start_as_current_span("send", attributes={"to": "33612345678"}),
    ):
        raise ValueError(text)
    provider.shutdown()

    [span] = exported.get_finished_spans()
    [event] = span.events
    assert event.name == "exception"
    rendered = json.dumps(
        [dict(event.attributes or {}), dict(span.attributes or {}), span.status.description]
    )
    for raw in ("0033612345678", "33612345678", "+33612345678", "06 12 34 56 78"):
        assert raw not in rendered
    expected = "no route to 0033******78, whatsapp:33******78, +33******78 or 06******78"
    assert event.attributes["exception.message"] == expected
    assert f"ValueError: {expected}" in event.attributes["exception.stacktrace"]
    assert span.status.description == f"ValueError: {expected}"
    assert span.attributes["to"] == "33******78"


SERVICE_WITH_A_FAILING_SPAN = """
from opentelemetry import trace
from infra.lifecycle import run_main

async def main(stop):
    try:
        with trace.get_tracer("test").start_as_current_span("send"):
            raise ValueError("no route to 0033612345678 or 06 12 34 56 78")
    except ValueError:
        pass

run_main(main, service="outbox")
"""


def test_span_file_of_a_service_has_the_exception_event_masked(tmp_path: Path) -> None:
    """Through the service set-up (`run_main` -> `setup_tracing`) to the exported file."""
    trace_file = tmp_path / "spans.jsonl"
    script = tmp_path / "service_main.py"
    script.write_text(SERVICE_WITH_A_FAILING_SPAN)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SNAPSELL_"))}
    environment.update({"PYTHONPATH": str(ROOT), "SNAPSELL_TRACE_FILE": str(trace_file)})
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=environment, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()

    text = trace_file.read_text()
    assert "0033612345678" not in text and "06 12 34 56 78" not in text
    [span] = [json.loads(line) for line in text.splitlines()]
    [event] = span["events"]
    expected = "no route to 0033******78 or 06******78"
    assert event["name"] == "exception"
    assert event["attributes"]["exception.message"] == expected
    assert span["status_description"] == f"ValueError: {expected}"
