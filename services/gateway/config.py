"""Gateway configuration from the environment (documented in the README)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from infra.config import (
    DEFAULT_BIND_HOST,
    ConfigError,
    env_bind_host,
    env_float,
    env_int,
    env_optional,
    env_str,
    env_url,
    env_url_list,
)


@dataclass(frozen=True)
class Config:
    http_port: int
    nats_url: str
    # What Twilio calls: signatures are checked against this base plus the request path.
    public_base_url: str
    default_auth_token: str | None
    auth_tokens: dict[str, str]  # AccountSid -> auth token
    publish_timeout_s: float
    max_body_bytes: int
    signature_failures_per_window: int
    signature_failure_window_s: float
    sender_messages_per_minute: int
    workers: int  # processes sharing the port (services/gateway/workers.py)
    # Status callbacks have their own body limit and bad-signature counter, so a flood on one
    # endpoint never blocks the other.
    status_max_body_bytes: int
    status_signature_failures_per_window: int
    # Proxies whose X-Forwarded-For names the client (the key of the per-source limits).
    forwarded_allow_ips: tuple[str, ...]
    body_read_timeout_s: float
    max_connections: int  # per process; past it, uvicorn answers 503
    bind_host: str = DEFAULT_BIND_HOST


def parse_auth_tokens(raw: str | None) -> dict[str, str]:
    """`AC1=token1,AC2=token2` -> {"AC1": "token1", "AC2": "token2"}."""
    tokens: dict[str, str] = {}
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        sid, sep, token = item.strip().partition("=")
        if not sep or not sid.startswith("AC") or not token:
            raise ConfigError("TWILIO_AUTH_TOKENS must look like AC...=token,AC...=token")
        tokens[sid] = token
    return tokens


def parse_forwarded_allow_ips(raw: str) -> tuple[str, ...]:
    """`10.0.0.0/8,192.168.1.10` -> the networks as given; never `*`, which would let any
    client choose the address its limits are counted against."""
    networks = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        if item == "*":
            raise ConfigError(
                "GATEWAY_FORWARDED_ALLOW_IPS must not be *: list the ingress controller's CIDRs"
            )
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(
                f'GATEWAY_FORWARDED_ALLOW_IPS: "{item}" is not an IP address or CIDR'
            ) from None
        networks.append(item)
    if not networks:
        raise ConfigError("GATEWAY_FORWARDED_ALLOW_IPS must name at least one address or CIDR")
    return tuple(networks)


def load_config() -> Config:
    public_base_url = env_url("PUBLIC_BASE_URL", schemes=("http", "https")).rstrip("/")
    if urlsplit(public_base_url).query:
        raise ConfigError("PUBLIC_BASE_URL must not carry a query string; Twilio's goes per URL")
    auth_tokens = parse_auth_tokens(env_optional("TWILIO_AUTH_TOKENS"))
    default_token = env_optional("TWILIO_AUTH_TOKEN")
    account_sid = env_optional("TWILIO_ACCOUNT_SID")
    if default_token and account_sid:
        auth_tokens.setdefault(account_sid, default_token)
    if not default_token and not auth_tokens:
        raise ConfigError("TWILIO_AUTH_TOKEN (or TWILIO_AUTH_TOKENS) is required")
    return Config(
        http_port=env_int("HTTP_PORT", 8080, minimum=0, maximum=65535),
        nats_url=env_url_list("NATS_URL", "nats://127.0.0.1:4222", schemes=("nats", "tls")),
        public_base_url=public_base_url,
        default_auth_token=default_token,
        auth_tokens=auth_tokens,
        publish_timeout_s=env_float(
            "GATEWAY_PUBLISH_TIMEOUT_SECONDS", 2.0, minimum=0.1, maximum=30
        ),
        max_body_bytes=env_int("GATEWAY_MAX_BODY_BYTES", 64 * 1024, minimum=1024, maximum=1 << 20),
        signature_failures_per_window=env_int(
            "GATEWAY_SIGNATURE_FAILURES_LIMIT", 20, minimum=1, maximum=1_000_000
        ),
        signature_failure_window_s=env_float(
            "GATEWAY_SIGNATURE_FAILURES_WINDOW_SECONDS", 60.0, minimum=1, maximum=86400
        ),
        sender_messages_per_minute=env_int(
            "GATEWAY_SENDER_MESSAGES_PER_MINUTE", 60, minimum=1, maximum=10_000_000
        ),
        workers=env_int("GATEWAY_WORKERS", 1, minimum=1, maximum=64),
        status_max_body_bytes=env_int(
            "GATEWAY_STATUS_MAX_BODY_BYTES", 16 * 1024, minimum=1024, maximum=1 << 20
        ),
        status_signature_failures_per_window=env_int(
            "GATEWAY_STATUS_SIGNATURE_FAILURES_LIMIT", 20, minimum=1, maximum=1_000_000
        ),
        forwarded_allow_ips=parse_forwarded_allow_ips(
            env_str("GATEWAY_FORWARDED_ALLOW_IPS", "127.0.0.1")
        ),
        body_read_timeout_s=env_float(
            "GATEWAY_BODY_READ_TIMEOUT_SECONDS", 5.0, minimum=0.1, maximum=120
        ),
        max_connections=env_int("GATEWAY_MAX_CONNECTIONS", 1024, minimum=1, maximum=1_000_000),
        bind_host=env_bind_host(),
    )
