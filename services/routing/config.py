"""The routing process's configuration, read once from the environment, failing fast.

Per-tenant consent settings live in configuration, not in a table: they change rarely, are
reviewed like code, and keep every routing replica's decision identical. `ROUTING_TENANT_RULES`
(or the file named by `ROUTING_TENANT_RULES_FILE`, e.g. a mounted ConfigMap) is a JSON object
keyed by tenant id; every field is optional:

    {"shop-1": {"opt_out_keywords": ["ANNULER"], "opt_in_keywords": ["OUI"],
                "help_keywords": ["AIDEZMOI"], "opt_out_reply": "...", "opt_in_reply": "...",
                "help_reply": "...", "item_code_pattern": "^[A-Z]\\\\d{1,3}$",
                "consent_scope": "channel"}}

Keywords are added to the standard lists (never replace them: STOP must always work).
`consent_scope` is "person" by default (a STOP on any phone channel stops the number on SMS and
WhatsApp alike) and "channel" narrows a tenant's consent to the channel it was expressed on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from infra.config import (
    ConfigError,
    env_address,
    env_bool,
    env_float,
    env_int,
    env_optional,
    env_str,
    env_url_list,
    tenant_objects,
)
from infra.retention import RetentionSettings, load_retention_settings, retention_days
from infra.streams import inbound_stream
from services.routing.domain import (
    DEFAULT_HELP_REPLY,
    DEFAULT_ITEM_CODE_PATTERN,
    DEFAULT_OPT_IN_REPLY,
    DEFAULT_OPT_OUT_REPLY,
    ConsentReplies,
    ConsentScope,
    KeywordConflictError,
    RulesBook,
    TenantRules,
)

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9101
_TENANT_FIELDS = frozenset(
    {
        "opt_out_keywords",
        "opt_in_keywords",
        "help_keywords",
        "opt_out_reply",
        "opt_in_reply",
        "help_reply",
        "item_code_pattern",
        "consent_scope",
    }
)


@dataclass(frozen=True, slots=True)
class Config:
    grpc_port: int
    metrics_port: int
    nats_url: str
    seller_admin_addr: str
    live_session_addr: str
    outbox_addr: str
    # Inbound consumer: batches being routed at once and messages per batch at most, JetStream
    # AckWait / MaxDeliver, and the cap of the growing delay before a message whose peer failed
    # is tried again.
    consumer_enabled: bool
    concurrency: int
    batch_size: int
    batch_linger_s: float
    ack_wait_s: float
    max_deliver: int
    retry_delay_cap_s: float
    peer_deadline_s: float
    sender_cache_ttl_s: float
    db_pool_size: int
    shutdown_grace_s: float
    rules: RulesBook
    # Purges: published events (RETENTION_*, EVENTS_RETENTION_DAYS) and the processed-inbound
    # ledger older than this (None: kept forever).
    retention: RetentionSettings
    ledger_max_age: timedelta | None


def _pattern(name: str, text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as error:
        raise ConfigError(f"{name} is not a valid regular expression: {error}") from None


def _words(tenant: str, field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
        raise ConfigError(f"ROUTING_TENANT_RULES[{tenant!r}].{field} must be a list of strings")
    return value


def _text(tenant: str, field: str, value: Any, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"ROUTING_TENANT_RULES[{tenant!r}].{field} must be a non-empty string")
    return value


def _scope(tenant: str, value: Any, default: ConsentScope) -> ConsentScope:
    if value is None:
        return default
    try:
        return ConsentScope(value)
    except ValueError:
        choices = ", ".join(repr(s.value) for s in ConsentScope)
        raise ConfigError(
            f"ROUTING_TENANT_RULES[{tenant!r}].consent_scope must be one of {choices}"
        ) from None


def parse_rules(raw: str | None, default: TenantRules) -> RulesBook:
    """The rules book from the JSON text of ROUTING_TENANT_RULES (None: defaults only)."""
    if not raw:
        return RulesBook(default=default)
    tenants: dict[str, TenantRules] = {}
    for tenant, name, settings in tenant_objects("ROUTING_TENANT_RULES", raw, _TENANT_FIELDS):
        try:
            keywords = default.keywords.extended(
                opt_out=_words(tenant, "opt_out_keywords", settings.get("opt_out_keywords", [])),
                opt_in=_words(tenant, "opt_in_keywords", settings.get("opt_in_keywords", [])),
                help=_words(tenant, "help_keywords", settings.get("help_keywords", [])),
            )
        except KeywordConflictError as error:
            raise ConfigError(f"{name}: {error}") from None
        replies = ConsentReplies(
            opt_out=_text(
                tenant, "opt_out_reply", settings.get("opt_out_reply"), default.replies.opt_out
            ),
            opt_in=_text(
                tenant, "opt_in_reply", settings.get("opt_in_reply"), default.replies.opt_in
            ),
            help=_text(tenant, "help_reply", settings.get("help_reply"), default.replies.help),
        )
        pattern = settings.get("item_code_pattern")
        item_code = (
            _pattern(f"{name}.item_code_pattern", pattern)
            if isinstance(pattern, str)
            else default.item_code
        )
        tenants[tenant] = TenantRules(
            keywords=keywords,
            replies=replies,
            item_code=item_code,
            consent_scope=_scope(tenant, settings.get("consent_scope"), default.consent_scope),
        )
    return RulesBook(default=default, tenants=tenants)


def load_rules() -> RulesBook:
    default = TenantRules(
        replies=ConsentReplies(
            opt_out=env_str("ROUTING_OPT_OUT_REPLY", DEFAULT_OPT_OUT_REPLY),
            opt_in=env_str("ROUTING_OPT_IN_REPLY", DEFAULT_OPT_IN_REPLY),
            help=env_str("ROUTING_HELP_REPLY", DEFAULT_HELP_REPLY),
        ),
        item_code=_pattern(
            "ROUTING_ITEM_CODE_PATTERN",
            env_str("ROUTING_ITEM_CODE_PATTERN", DEFAULT_ITEM_CODE_PATTERN),
        ),
    )
    raw = env_optional("ROUTING_TENANT_RULES")
    path = env_optional("ROUTING_TENANT_RULES_FILE")
    if raw and path:
        raise ConfigError("set ROUTING_TENANT_RULES or ROUTING_TENANT_RULES_FILE, not both")
    if path:
        try:
            raw = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"ROUTING_TENANT_RULES_FILE: cannot read {path}: {error}") from None
    return parse_rules(raw, default)


def load_config() -> Config:
    concurrency = env_int("ROUTING_CONCURRENCY", 4, minimum=1, maximum=512)
    return Config(
        grpc_port=env_int("GRPC_PORT", DEFAULT_GRPC_PORT, minimum=0, maximum=65535),
        metrics_port=env_int("METRICS_PORT", DEFAULT_METRICS_PORT, minimum=0, maximum=65535),
        nats_url=env_url_list("NATS_URL", schemes=("nats", "tls")),
        seller_admin_addr=env_address("SELLER_ADMIN_ADDR", "127.0.0.1:50054"),
        live_session_addr=env_address("LIVE_SESSION_ADDR", "127.0.0.1:50053"),
        outbox_addr=env_address("OUTBOX_ADDR", "127.0.0.1:50052"),
        # Off: serve the consent API only (e.g. an outbox test that needs CheckOptOut but must
        # not take inbound messages from the shared stream).
        consumer_enabled=env_bool("ROUTING_CONSUMER_ENABLED", True),
        concurrency=concurrency,
        batch_size=env_int("ROUTING_BATCH_SIZE", 100, minimum=1, maximum=500),
        batch_linger_s=env_float("ROUTING_BATCH_LINGER_MS", 10.0, minimum=0.0, maximum=1000.0)
        / 1000,
        ack_wait_s=env_float("ROUTING_ACK_WAIT_SECONDS", 30.0, minimum=5.0, maximum=600.0),
        # 120 deliveries with delays growing to 30 s: a peer may be down for about an hour
        # before a message is recorded as dead.
        max_deliver=env_int("ROUTING_MAX_DELIVER", 120, minimum=2, maximum=10_000),
        retry_delay_cap_s=env_float(
            "ROUTING_RETRY_DELAY_CAP_SECONDS", 30.0, minimum=0.1, maximum=3600.0
        ),
        peer_deadline_s=env_float("ROUTING_PEER_DEADLINE_SECONDS", 3.0, minimum=0.1, maximum=60.0),
        sender_cache_ttl_s=env_float(
            "ROUTING_SENDER_CACHE_TTL_SECONDS", 30.0, minimum=0.0, maximum=3600.0
        ),
        # Each batch holds a connection for its whole transaction; leave room for the API.
        db_pool_size=env_int("ROUTING_DB_POOL_SIZE", concurrency + 8, minimum=2, maximum=600),
        shutdown_grace_s=env_float("SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0, maximum=300.0),
        rules=load_rules(),
        retention=load_retention_settings(),
        # Longer than the INBOUND stream keeps messages: a replay of the stream (a consumer
        # reset, a redelivery) must still find every MessageSid it can bring back.
        ledger_max_age=retention_days(
            "ROUTING_LEDGER_RETENTION_DAYS",
            30,
            minimum=int(inbound_stream().max_age_s // 86400) + 1,
        ),
    )
