"""The live_catalog process's configuration, read once from the environment, failing fast.

Per-tenant settings: `LIVE_CATALOG_TENANT_SETTINGS` is a JSON object keyed by tenant id, each
value an object with any of
- `replies`: reply texts by name (see `domain.Replies`; same placeholders as the default);
- `cancel_keywords`, `stock_keywords`, `close_keywords`: words added to the defaults;
- `item_code_pattern`: a regular expression for item codes (default `[A-Za-z]{1,3}\\d{1,4}`);
- `summary_content_sid`: the WhatsApp template (`HX` + 32 hex) for end-of-live summaries to
  buyers outside the 24-hour window, instead of `LIVE_CATALOG_SUMMARY_CONTENT_SID`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from infra.config import (
    ConfigError,
    env_address,
    env_bool,
    env_float,
    env_int,
    env_optional,
    env_url_list,
    tenant_objects,
)
from infra.retention import RetentionSettings, load_retention_settings, retention_days
from infra.streams import events_stream
from services.live_catalog.domain import Grammar, Replies, SettingsBook, TenantSettings

DEFAULT_GRPC_PORT = 50055
DEFAULT_METRICS_PORT = 9105
_CONTENT_SID = re.compile(r"^HX[0-9a-fA-F]{32}$")
_TENANT_FIELDS = frozenset(
    {
        "replies",
        "cancel_keywords",
        "stock_keywords",
        "close_keywords",
        "item_code_pattern",
        "summary_content_sid",
    }
)


@dataclass(frozen=True, slots=True)
class Config:
    grpc_port: int
    metrics_port: int
    nats_url: str
    outbox_addr: str
    consumer_enabled: bool
    concurrency: int
    ack_wait_s: float
    max_deliver: int
    hold: timedelta
    default_max_per_client: int
    sweep_interval_s: float
    peer_deadline_s: float
    db_pool_size: int
    shutdown_grace_s: float
    settings: SettingsBook
    retention: RetentionSettings
    ledger_max_age: timedelta | None


def _content_sid(name: str, value: Any) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not _CONTENT_SID.match(value):
        raise ConfigError(f"{name} must be a Content SID (HX + 32 hex digits)")
    return value


def _words(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(w, str) and w.strip() for w in value):
        raise ConfigError(f"{name} must be a list of words")
    return value


def parse_settings(raw: str | None, default: TenantSettings) -> SettingsBook:
    """The settings book from the JSON text of LIVE_CATALOG_TENANT_SETTINGS."""
    if not raw:
        return SettingsBook(default=default)
    tenants: dict[str, TenantSettings] = {}
    for tenant, name, settings in tenant_objects(
        "LIVE_CATALOG_TENANT_SETTINGS", raw, _TENANT_FIELDS
    ):
        texts = settings.get("replies", {})
        if not isinstance(texts, dict) or not all(isinstance(t, str) for t in texts.values()):
            raise ConfigError(f"{name}.replies must be an object of texts")
        pattern = settings.get("item_code_pattern")
        if pattern is not None:
            try:
                re.compile(pattern)
            except (re.error, TypeError):
                raise ConfigError(f"{name}.item_code_pattern is not a regular expression") from None
        try:
            replies = default.replies.overridden(texts)
        except ValueError as error:
            raise ConfigError(f"{name}.replies: {error}") from None
        grammar = default.grammar.extended(
            cancel=_words(f"{name}.cancel_keywords", settings.get("cancel_keywords", [])),
            stock=_words(f"{name}.stock_keywords", settings.get("stock_keywords", [])),
            close=_words(f"{name}.close_keywords", settings.get("close_keywords", [])),
            item_code=pattern,
        )
        content_sid = _content_sid(
            f"{name}.summary_content_sid", settings.get("summary_content_sid")
        )
        tenants[tenant] = TenantSettings(
            grammar=grammar,
            replies=replies,
            summary_content_sid=content_sid or default.summary_content_sid,
        )
    return SettingsBook(default=default, tenants=tenants)


def load_config() -> Config:
    # Routed messages in flight: those of one item are decided in received_at order together.
    concurrency = env_int("LIVE_CATALOG_CONCURRENCY", 256, minimum=1, maximum=2048)
    default = TenantSettings(
        grammar=Grammar(),
        replies=Replies(),
        summary_content_sid=_content_sid(
            "LIVE_CATALOG_SUMMARY_CONTENT_SID", env_optional("LIVE_CATALOG_SUMMARY_CONTENT_SID")
        ),
    )
    return Config(
        grpc_port=env_int("GRPC_PORT", DEFAULT_GRPC_PORT, minimum=0, maximum=65535),
        metrics_port=env_int("METRICS_PORT", DEFAULT_METRICS_PORT, minimum=0, maximum=65535),
        nats_url=env_url_list("NATS_URL", schemes=("nats", "tls")),
        outbox_addr=env_address("OUTBOX_ADDR", "127.0.0.1:50052"),
        consumer_enabled=env_bool("LIVE_CATALOG_CONSUMER_ENABLED", True),
        concurrency=concurrency,
        ack_wait_s=env_float("LIVE_CATALOG_ACK_WAIT_SECONDS", 30.0, minimum=5.0, maximum=600.0),
        max_deliver=env_int("LIVE_CATALOG_MAX_DELIVER", 120, minimum=2, maximum=10_000),
        hold=timedelta(
            minutes=env_int("LIVE_CATALOG_HOLD_MINUTES", 30, minimum=1, maximum=7 * 24 * 60)
        ),
        default_max_per_client=env_int(
            "LIVE_CATALOG_DEFAULT_MAX_PER_CLIENT", 1, minimum=1, maximum=100
        ),
        sweep_interval_s=env_float(
            "LIVE_CATALOG_SWEEP_INTERVAL_SECONDS", 10.0, minimum=0.1, maximum=3600.0
        ),
        peer_deadline_s=env_float(
            "LIVE_CATALOG_PEER_DEADLINE_SECONDS", 3.0, minimum=0.1, maximum=60.0
        ),
        # The routed messages use one connection per batch; the rest serve the API, the
        # sweeper, the reply dispatcher and the event relay.
        db_pool_size=env_int("LIVE_CATALOG_DB_POOL_SIZE", 16, minimum=2, maximum=600),
        shutdown_grace_s=env_float("SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0, maximum=300.0),
        settings=parse_settings(env_optional("LIVE_CATALOG_TENANT_SETTINGS"), default),
        retention=load_retention_settings(),
        # Longer than routing's event stream keeps messages: a replay of the stream must still
        # find every MessageSid it can bring back.
        ledger_max_age=retention_days(
            "LIVE_CATALOG_LEDGER_RETENTION_DAYS",
            30,
            minimum=int(events_stream("routing").max_age_s // 86400) + 1,
        ),
    )
