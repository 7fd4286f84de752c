"""Reading configuration from the environment, failing fast with a one-line message.

Every service builds a frozen `Config` from these helpers in its own `config.py`; a missing or
malformed value raises `ConfigError`, which `infra.lifecycle.run_main` prints and exits on.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

# Where a process listens unless BIND_HOST says otherwise: every interface, as a pod needs;
# `make run` sets loopback.
DEFAULT_BIND_HOST = "0.0.0.0"


class ConfigError(Exception):
    """A configuration value is missing or malformed. The message is one line for the operator."""


CONFIGURATION_ERROR_EXIT = 2  # the exit code of a process stopped by a ConfigError


def env_str(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, "").strip()
    if value:
        return value
    if default is None:
        raise ConfigError(f"{name} is required")
    return default


def env_optional(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def env_int(name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (lower case; the value is compared in lower case)."""
    raw = env_str(name, default)
    if raw.lower() not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw.lower()


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def env_url(name: str, default: str | None = None, *, schemes: tuple[str, ...]) -> str:
    value = env_str(name, default)
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        expected = " or ".join(f"{s}://" for s in schemes)
        raise ConfigError(f"{name} must be a {expected} URL, got {value!r}")
    return value


def env_url_list(name: str, default: str | None = None, *, schemes: tuple[str, ...]) -> str:
    """One URL, or several separated by commas (every server of a cluster, e.g. `NATS_URL=
    nats://nats-0:4222,nats://nats-1:4222,nats://nats-2:4222`); each is checked as `env_url`
    checks one. The value as given; `url_list` splits it."""
    value = env_str(name, default)
    urls = [urlsplit(url) for url in url_list(value)]
    if not urls or any(url.scheme not in schemes or not url.netloc for url in urls):
        expected = " or ".join(f"{s}://" for s in schemes)
        raise ConfigError(f"{name} must be {expected} URLs separated by commas, got {value!r}")
    return value


def url_list(value: str) -> list[str]:
    """The URLs of a comma-separated list, blanks around them dropped."""
    return [url.strip() for url in value.split(",") if url.strip()]


def env_address(name: str, default: str) -> str:
    """A `host:port` peer address."""
    value = env_str(name, default)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{name} must be host:port, got {value!r}")
    return value


def env_bind_host() -> str:
    """`BIND_HOST`: the IP address every listener of the process binds (gRPC, metrics, HTTP)."""
    value = env_str("BIND_HOST", DEFAULT_BIND_HOST)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"BIND_HOST must be an IP address, got {value!r}") from None
    return value


def tenant_objects(
    name: str, raw: str, fields: frozenset[str]
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """The entries of the JSON text `raw` of variable `name`, an object keyed by tenant id whose
    values are objects with keys among `fields`: (tenant id, `name[tenant]` for messages, its
    object)."""
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{name} is not valid JSON: {error.msg}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{name} must be a JSON object keyed by tenant id")
    for tenant, settings in document.items():
        where = f"{name}[{tenant!r}]"
        if not isinstance(settings, dict):
            raise ConfigError(f"{where} must be an object")
        if unknown := set(settings) - fields:
            raise ConfigError(f"{where} has unknown keys {sorted(unknown)}")
        yield tenant, where, settings
