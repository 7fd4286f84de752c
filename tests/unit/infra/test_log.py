"""JSON-lines logging: shape, trace ids, and that phones, JWTs and secrets never get out."""

from __future__ import annotations

import io
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace import TracerProvider

from infra import log
from infra.auth import issue_token
from infra.config import ConfigError
from infra.keys import new_signing_key
from infra.log import JsonLineFormatter, configured_secrets, mask_phone, setup_logging

TWILIO_TOKEN = "0123456789abcdef0123456789abcdef"
JWT = issue_token(new_signing_key("operator"), sub="a", role="admin", audience="outbox")


def record(message: str, *args: object, fields: dict | None = None) -> logging.LogRecord:
    made = logging.LogRecord("svc.module", logging.INFO, __file__, 1, message, args, None)
    if fields is not None:
        made.fields = fields
    return made


def formatted(made: logging.LogRecord, secrets: tuple[str, ...] = (TWILIO_TOKEN,)) -> dict:
    line = JsonLineFormatter("routing", secrets).format(made)
    assert "\n" not in line
    return json.loads(line)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("+33612345678", "+33******78"),
        ("whatsapp:+14155238886", "whatsapp:+14******86"),
        ("+33 6 12 34 56 78", "+33******78"),
        ("from +447700900123 to +33612345678.", "from +44******23 to +33******78."),
        ("+1234567", "+1234567"),  # too short to be a phone number
        ("order 4521 of 2026-12-07 total +5", "order 4521 of 2026-12-07 total +5"),
    ],
)
def test_mask_phone_keeps_the_country_prefix_and_last_two_digits(text: str, masked: str) -> None:
    assert mask_phone(text) == masked


def test_record_is_one_json_object_with_the_standard_fields() -> None:
    line = formatted(record("message.routed", fields={"tenant_id": "t1", "attempt": 2}))
    assert line["service"] == "routing"
    assert line["event"] == "message.routed"
    assert line["level"] == "INFO"
    assert line["logger"] == "svc.module"
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert (line["tenant_id"], line["attempt"]) == ("t1", 2)
    assert "trace_id" not in line


def test_fields_cannot_overwrite_the_standard_fields() -> None:
    line = formatted(record("real.event", fields={"event": "fake", "service": "x", "k": 1}))
    assert (line["event"], line["service"], line["k"]) == ("real.event", "routing", 1)


def test_phones_are_masked_in_message_fields_and_nested_values() -> None:
    made = record(
        "from %s",
        "whatsapp:+33612345678",
        fields={"to": "+14155238886", "nested": {"list": ["+447700900123"]}},
    )
    text = JsonLineFormatter("routing").format(made)
    for raw in ("33612345678", "14155238886", "447700900123"):
        assert raw not in text
    line = json.loads(text)
    assert line["event"] == "from whatsapp:+33******78"
    assert line["nested"] == {"list": ["+44******23"]}


def test_jwts_and_configured_secrets_are_removed() -> None:
    made = record(
        "auth header Bearer %s", JWT, fields={"twilio": f"token={TWILIO_TOKEN}", "jwt": JWT}
    )
    text = JsonLineFormatter("routing", (TWILIO_TOKEN,)).format(made)
    assert JWT not in text and TWILIO_TOKEN not in text
    assert "eyJ" not in text
    line = json.loads(text)
    assert line["event"] == "auth header Bearer ***"
    assert line["twilio"] == "token=***"


def test_secrets_with_characters_json_escapes_are_removed_too() -> None:
    secret = 'to"ken\\with-quote'
    line = JsonLineFormatter("routing", (secret,)).format(record("x", fields={"v": secret}))
    assert json.loads(line)["v"] == "***"


def test_exceptions_are_included_and_redacted() -> None:
    try:
        raise ValueError("bad number +33612345678")
    except ValueError:
        made = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    line = formatted(made)
    assert "ValueError: bad number +33******78" in line["exception"]


def test_trace_and_span_ids_come_from_the_current_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        line = formatted(record("inside.span"))
    context = span.get_span_context()
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")


def test_values_json_cannot_encode_are_logged_as_text() -> None:
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    line = formatted(record("odd", fields={"id": uuid.UUID(int=1), "at": at}))
    assert line["id"] == "00000000-0000-0000-0000-000000000001"
    assert line["at"] == "2025-01-02 03:04:05+00:00"


def test_secrets_come_from_the_twilio_and_jwt_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "main-token-value")
    monkeypatch.setenv("TWILIO_AUTH_TOKENS", "AC1=first-token-value, AC2=second-token-value")
    monkeypatch.setenv("SNAPSELL_JWT_SECRET", "jwt-secret-value-0123456789abcdef")
    assert sorted(configured_secrets()) == sorted(
        [
            "main-token-value",
            "first-token-value",
            "second-token-value",
            "jwt-secret-value-0123456789abcdef",
        ]
    )


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_setup_logging_writes_redacted_json_lines(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
    monkeypatch.setenv("LOG_LEVEL", "warning")
    stream = io.StringIO()
    setup_logging("outbox", stream=stream)
    logging.getLogger("infra.test").info("hidden.below.level")
    logging.getLogger("infra.test").warning("send.failed", extra={"fields": {"tok": TWILIO_TOKEN}})
    [line] = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert (line["service"], line["event"], line["tok"]) == ("outbox", "send.failed", "***")


def test_invalid_log_level_is_a_configuration_error(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        setup_logging("outbox", stream=io.StringIO())


def test_national_numbers_are_read_in_the_configured_regions(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log, "_phone_regions", log.DEFAULT_PHONE_REGIONS)  # restored after
    uk_mobile = "07911 123456"
    monkeypatch.setenv("LOG_PHONE_REGIONS", "FR,US")
    setup_logging("outbox", stream=io.StringIO())
    assert mask_phone(f"to {uk_mobile}") == f"to {uk_mobile}"
    monkeypatch.setenv("LOG_PHONE_REGIONS", "fr, gb")
    setup_logging("outbox", stream=io.StringIO())
    assert mask_phone(f"to {uk_mobile}") == "to 07******56"


def test_unknown_phone_region_is_a_configuration_error(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_PHONE_REGIONS", "FR,XX")
    with pytest.raises(ConfigError, match="LOG_PHONE_REGIONS"):
        setup_logging("outbox", stream=io.StringIO())


def test_a_long_run_of_figures_is_masked_whole_without_parsing_it() -> None:
    figures = " ".join(str(n) for n in range(10, 200))
    parsed_before = log._is_phone_number.cache_info().misses
    assert mask_phone(f"ids {figures}.") == "ids 10******99."
    assert log._is_phone_number.cache_info().misses == parsed_before
