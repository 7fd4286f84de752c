"""JSON-lines logs on stdout, one object per record, safe to ship anywhere.

    log = get_logger(__name__)
    log.info("message.routed", extra={"fields": {"tenant_id": t, "from": sender}})

gives `{"ts": ..., "level": "INFO", "service": "routing", "event": "message.routed",
"logger": ..., "trace_id": ..., "span_id": ..., "tenant_id": ..., "from": "+33******78"}`.
Redaction runs over the final line, so it also covers messages, nested fields and tracebacks:
phone numbers are masked, JWTs and the configured Twilio tokens and JWT secret are removed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from opentelemetry import trace

from infra.config import ConfigError, env_optional, env_str

# E.164-like: "+" then 8-15 digits, optionally grouped by single spaces, dots or dashes.
_PHONE = re.compile(r"\+\d(?:[ .\-]?\d){7,14}")
_JWT = re.compile(r"eyJ[\w-]*\.eyJ[\w-]*\.[\w-]*")
_CORE_KEYS = frozenset({"ts", "level", "service", "event", "logger", "trace_id", "span_id"})
# Shorter "secrets" would turn ordinary words into *** all over the logs.
_MIN_SECRET_CHARS = 8

_service = "unknown"


def _mask_match(match: re.Match[str]) -> str:
    text = match.group()
    return f"{text[:3]}******{text[-2:]}"


def mask_phone(text: str) -> str:
    """Mask every phone number in `text`: "+33612345678" -> "+33******78"."""
    return _PHONE.sub(_mask_match, text)


class JsonLineFormatter(logging.Formatter):
    def __init__(self, service: str, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._service = service
        # Both spellings: a secret with quotes or backslashes appears escaped in the JSON line.
        kept = [s for s in secrets if len(s) >= _MIN_SECRET_CHARS]
        self._secrets = tuple(dict.fromkeys([*kept, *(json.dumps(s)[1:-1] for s in kept)]))

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "event": record.getMessage(),
            "logger": record.name,
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            payload["trace_id"] = format(span_context.trace_id, "032x")
            payload["span_id"] = format(span_context.span_id, "016x")
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                if key not in _CORE_KEYS:
                    payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        line = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)
        return self.redact(line)

    def redact(self, line: str) -> str:
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, "***")
        if "eyJ" in line:
            line = _JWT.sub("***", line)
        if "+" in line:
            line = _PHONE.sub(_mask_match, line)
        return line


def configured_secrets() -> list[str]:
    """Secret values from the environment that must never appear in a log line."""
    secrets = [env_optional("TWILIO_AUTH_TOKEN"), env_optional("SNAPSELL_JWT_SECRET")]
    for entry in (env_optional("TWILIO_AUTH_TOKENS") or "").split(","):
        secrets.append(entry.partition("=")[2].strip())
    return [s for s in secrets if s]


def _log_level() -> int:
    name = env_str("LOG_LEVEL", "INFO").upper()
    level = logging.getLevelNamesMapping().get(name)
    if level is None:
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {name!r}")
    return level


def setup_logging(service: str, *, stream: TextIO | None = None) -> None:
    """Send every log record of the process to `stream` (stdout) as redacted JSON lines."""
    global _service
    level = _log_level()
    _service = service
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonLineFormatter(service, configured_secrets()))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def service_name() -> str:
    """The name given to `setup_logging`: this process's identity in logs, tokens and metrics."""
    return _service


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
