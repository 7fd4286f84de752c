"""JSON-lines logs on stdout, one object per record, safe to ship anywhere.

    log = get_logger(__name__)
    log.info("message.routed", extra={"fields": {"tenant_id": t, "from": sender}})

gives `{"ts": ..., "level": "INFO", "service": "routing", "event": "message.routed",
"logger": ..., "trace_id": ..., "span_id": ..., "tenant_id": ..., "from": "+33******78"}`.
Phone numbers and messaging IDs are masked (`mask_phone`) in everything a caller puts in a
record: the message, field names and nested values, tracebacks. JWTs and the configured Twilio
tokens and JWT secret are removed from the whole line.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import phonenumbers

from infra.config import ConfigError, env_optional, env_str

# Every form a phone number, or an ID that reaches a person, takes in a log line, in the order
# they are masked (each pass is skipped or cheap on a line without one; the log path is hot):
# 1. with a scheme: `whatsapp:+336...`, `sms:+336...`, `whatsapp:336...`, `messenger:<PSID>`;
# 2. E.164: "+" then 8-15 digits, optionally grouped by single spaces, dots or dashes;
# 3. any other run of 8 or more digits, optionally grouped and with an area code in
#    parentheses (`0033612345678`, `06 12 34 56 78`, `(415) 555-0123`, a WaId `33612345678`),
#    masked only when phonenumbers finds a valid number in it (`_is_phone_number`), so
#    dates, ports, counts and digits inside identifiers (MessageSids, trace ids) stay readable.
#    A run starts and ends at a word boundary that is not part of a date, time, decimal or
#    UUID (or just after an escaped newline or tab of the JSON line). The pattern opens with
#    its first seven characters, so the regex engine skips to candidates quickly.
_SCHEME_ADDRESS = re.compile(r"(whatsapp:|sms:|tel:|messenger:)(\+?\d(?:[ .\-]?\d){4,19})")
_E164 = re.compile(r"\+\d(?:[ .\-]?\d){7,14}")
_DIGIT_RUN = re.compile(
    r"[\d(](?=[\d .()\-]{6})(?:(?<![\w+*.\-].)|(?<=\\[nrt].))"
    r"(?:(?<=\()\d{1,5}\) ?\d|(?<=\d))(?:[ .\-]?\d){6,}(?![\w:\-]|\.\d)"
)
_DIGIT_GROUP = re.compile(r"\d+")
_ANY_DIGIT = re.compile(r"\d").search
# A word of a digit run (between spaces and dashes), and what is something else than a phone
# number: a date, and dotted words (a decimal number, an IPv4 address, a version).
_RUN_WORD = re.compile(r"\(?\d+\)?(?:\.\d+)*")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_NOT_A_PHONE = re.compile(r"\d+\.\d+|\d{1,3}(?:\.\d{1,3}){3}|(?=[\d.]*\d{5})\d+(?:\.\d+)+")
# Shortest and longest digit counts of a number written without "+" ("00" prefix included).
_MIN_DIGITS, _MAX_DIGITS = 8, 17
# A run of more groups than this is masked whole, unsearched: searching it costs parses in
# proportion to its length, and a list of figures that long is rare in a log line.
_MAX_RUN_GROUPS = 12
_JWT = re.compile(r"eyJ[\w-]*\.eyJ[\w-]*\.[\w-]*")
_CORE_KEYS = frozenset({"ts", "level", "service", "event", "logger", "trace_id", "span_id"})
# Shorter "secrets" would turn ordinary words into *** all over the logs.
_MIN_SECRET_CHARS = 8
# Where national numbers (`06 12 34 56 78`, `(415) 555-0123`) are read from: LOG_PHONE_REGIONS.
DEFAULT_PHONE_REGIONS = ("FR", "US")

_service = "unknown"
_phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS


def _valid_international(text: str) -> bool:
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(text, None))
    except phonenumbers.NumberParseException:
        return False


def _valid_national(digits: str, region: str) -> bool:
    """Valid in `region` and written as that country writes it (trunk prefix included):
    `0612345678` in FR, `4155550123` in US, but not `192168100` in FR."""
    try:
        parsed = phonenumbers.parse(digits, region)
    except phonenumbers.NumberParseException:
        return False
    if not phonenumbers.is_valid_number(parsed):
        return False
    national = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
    return "".join(_DIGIT_GROUP.findall(national)) == digits


# The same numbers come back line after line (one conversation): parse each once.
@functools.lru_cache(maxsize=4096)
def _is_phone_number(digits: str, regions: tuple[str, ...]) -> bool:
    """Whether bare `digits` are a phone number: international after "00", international
    without its "+" (a WhatsApp WaId), or national in one of `regions`."""
    if digits.startswith("00"):
        return _valid_international(f"+{digits[2:]}")
    if digits[0] != "0" and _valid_international(f"+{digits}"):
        return True
    return any(_valid_national(digits, region) for region in regions)


def _masked_digits(digits: str) -> str:
    if digits.startswith("00"):
        return f"00{digits[2:4]}******{digits[-2:]}"
    return f"{digits[:2]}******{digits[-2:]}"


def _masked_e164(text: str) -> str:
    return f"{text[:3]}******{text[-2:]}"


def _mask_digit_run(text: str) -> str:
    """Mask the phone number in a run of grouped digits, if there is one: the whole run, or
    else the longest run of whole groups that is one (`attempt 3 06 12 34 56 78`). Groups
    after the second have two digits or more, as phone numbers are written (`0033 6 12 34 56
    78`, `1 415 555 0123`; `1 2 3 4` is not one)."""
    if _DATE.fullmatch(text):
        return text
    groups: list[re.Match[str] | None] = []  # None: a word no phone number goes through
    for word in _RUN_WORD.finditer(text):
        if "." in word.group() and _NOT_A_PHONE.fullmatch(word.group()):
            groups.append(None)
            continue
        for group in _DIGIT_GROUP.finditer(text, word.start(), word.end()):
            groups.append(group if len(groups) < 2 or len(group.group()) > 1 else None)
    if sum(group is not None for group in groups) > _MAX_RUN_GROUPS:
        return _masked_digits("".join(_DIGIT_GROUP.findall(text)))
    for size in range(min(len(groups), _MAX_DIGITS // 2 + 1), 0, -1):
        for start in range(len(groups) - size + 1):
            part = [group for group in groups[start : start + size] if group is not None]
            if len(part) < size:  # a word no phone number goes through
                continue
            digits = "".join(group.group() for group in part)
            if _MIN_DIGITS <= len(digits) <= _MAX_DIGITS and _is_phone_number(
                digits, _phone_regions
            ):
                head, tail = text[: part[0].start()], text[part[-1].end() :]
                if head == "(":  # the area code's parenthesis: "(415) 555-0123" -> "41******23"
                    head = ""
                return _mask_digit_run(head) + _masked_digits(digits) + _mask_digit_run(tail)
    return text


def _mask_scheme_address(match: re.Match[str]) -> str:
    scheme, address = match.groups()
    if address[0] == "+":
        return scheme + _masked_e164(address)
    return scheme + _masked_digits("".join(_DIGIT_GROUP.findall(address)))


def _mask_e164(match: re.Match[str]) -> str:
    return _masked_e164(match.group())


def _mask_digit_run_match(match: re.Match[str]) -> str:
    return _mask_digit_run(match.group())


def mask_phone(text: str) -> str:
    """Mask every phone number and messaging ID in `text`: "+33612345678" -> "+33******78",
    "0033612345678" -> "0033******78", "06 12 34 56 78" -> "06******78",
    "messenger:1234567890123456" -> "messenger:12******56"."""
    if _ANY_DIGIT(text) is None:
        return text
    if "whatsapp:" in text or "sms:" in text or "tel:" in text or "messenger:" in text:
        text = _SCHEME_ADDRESS.sub(_mask_scheme_address, text)
    if "+" in text:
        text = _E164.sub(_mask_e164, text)
    return _DIGIT_RUN.sub(_mask_digit_run_match, text)


class JsonLineFormatter(logging.Formatter):
    def __init__(self, service: str, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._service = service
        # Both spellings: a secret with quotes or backslashes appears escaped in the JSON line.
        kept = [s for s in secrets if len(s) >= _MIN_SECRET_CHARS]
        self._secrets = tuple(dict.fromkeys([*kept, *(json.dumps(s)[1:-1] for s in kept)]))

    def format(self, record: logging.LogRecord) -> str:
        # Only what a caller put in the record (message, fields, exception) can hold a phone
        # number: the time, names and trace ids are ours and full of digits, so the scan
        # skips them.
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "event": mask_phone(record.getMessage()),
            "logger": record.name,
        }
        # Looked up, not imported: a process that never loaded OpenTelemetry has no span, and
        # the gateway's supervisor stays ~2.5 MB smaller without it.
        trace = sys.modules.get("opentelemetry.trace")
        span_context = trace.get_current_span().get_span_context() if trace else None
        if span_context is not None and span_context.is_valid:
            payload["trace_id"] = format(span_context.trace_id, "032x")
            payload["span_id"] = format(span_context.span_id, "016x")
        extra: dict[str, Any] = {}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                if key not in _CORE_KEYS:
                    extra[key] = value
        if record.exc_info:
            extra["exception"] = self.formatException(record.exc_info)
        line = _json_object(payload)
        if extra:
            line = f"{line[:-1]},{mask_phone(_json_object(extra))[1:]}"
        return self.remove_secrets(line)

    def remove_secrets(self, line: str) -> str:
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, "***")
        if "eyJ" in line:
            line = _JWT.sub("***", line)
        return line

    def redact(self, line: str) -> str:
        """Secrets, JWTs and phone numbers out of any text."""
        return mask_phone(self.remove_secrets(line))


# One encoder for every line (json.dumps with options builds a new one per call).
_json_object = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


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


def _phone_regions_setting() -> tuple[str, ...]:
    text = env_str("LOG_PHONE_REGIONS", ",".join(DEFAULT_PHONE_REGIONS))
    regions = tuple(part.strip().upper() for part in text.split(",") if part.strip())
    unknown = [region for region in regions if region not in phonenumbers.SUPPORTED_REGIONS]
    if not regions or unknown:
        raise ConfigError(
            f"LOG_PHONE_REGIONS must list ISO 3166 country codes (e.g. FR,US), got {text!r}"
        )
    return regions


def setup_logging(service: str, *, stream: TextIO | None = None) -> None:
    """Send every log record of the process to `stream` (stdout) as redacted JSON lines."""
    global _service, _phone_regions
    level = _log_level()
    regions = _phone_regions_setting()
    _service = service
    _phone_regions = regions
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
