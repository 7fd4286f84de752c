"""The outbox process's configuration, read once from the environment, failing fast."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

from infra.config import (
    ConfigError,
    env_address,
    env_bool,
    env_float,
    env_int,
    env_optional,
    env_str,
    env_url,
    env_url_list,
)
from infra.retention import RetentionSettings, load_retention_settings, retention_days
from services.outbox.domain import RetryPolicy
from services.outbox.metrics import TenantClasses

DEFAULT_GRPC_PORT = 50052
DEFAULT_METRICS_PORT = 9102
DEFAULT_TWILIO_API = "https://api.twilio.com"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    enabled: bool
    # Sends in flight at once, per process.
    max_in_flight: int
    # Rows claimed per statement (and the most results written per statement).
    claim_batch: int
    lease_s: float
    # Fallback when a NOTIFY is missed (e.g. while the listener reconnects).
    poll_interval_s: float
    # How long results may wait to be written together (latency cost of batching).
    flush_interval_s: float
    send_timeout_s: float
    retry: RetryPolicy
    # 0 turns the per-sender rate limit off.
    rate_per_sender: float
    rate_burst: float
    # Before reconciling an unknown outcome, and between reconciliation tries.
    reconcile_delay_s: float
    # Tolerated difference between Twilio's clock and ours when matching by date.
    reconcile_clock_skew_s: float
    # A message waits this long when routing cannot answer a consent check.
    consent_retry_s: float
    consent_timeout_s: float
    # No send is decided on an older consent answer: waiting messages' answers are asked again
    # in batches at half this age, and a send that finds its answer older asks again alone.
    consent_max_age_s: float
    whatsapp_window_s: float
    # Metric labels only (services/outbox/metrics.py): which class each tenant is in.
    tenant_classes: TenantClasses = field(default_factory=TenantClasses)
    # An enqueue in this process inserts the messages the pipeline has room for already
    # claimed and hands them to it (sending/pipeline.py, "Direct dispatch").
    direct_dispatch: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    grpc_port: int
    metrics_port: int
    nats_url: str
    routing_addr: str
    # seller_admin's channel directory: which senders each tenant may send from, cached this
    # long (its channel events drop an entry sooner), asked with this deadline.
    seller_admin_addr: str
    channel_cache_ttl_s: float
    channel_directory_timeout_s: float
    public_base_url: str
    twilio_api_base_url: str
    # Account SID -> auth token; never logged.
    twilio_accounts: dict[str, str] = field(repr=False)
    worker: WorkerConfig
    status_consumer_concurrency: int
    db_pool_size: int
    shutdown_grace_s: float
    # Purges: published events (RETENTION_*, EVENTS_RETENTION_DAYS) and finished messages (with
    # their attempts) last changed longer ago than this (None: kept forever).
    retention: RetentionSettings
    finished_max_age: timedelta | None


def _twilio_accounts() -> dict[str, str]:
    accounts = {env_str("TWILIO_ACCOUNT_SID"): env_str("TWILIO_AUTH_TOKEN")}
    for entry in (env_optional("TWILIO_AUTH_TOKENS") or "").split(","):
        if not entry.strip():
            continue
        sid, sep, token = entry.strip().partition("=")
        if not sep or not sid.startswith("AC") or not token:
            raise ConfigError("TWILIO_AUTH_TOKENS must be AC...=token pairs separated by commas")
        accounts[sid] = token
    return accounts


def _retry_policy() -> RetryPolicy:
    return RetryPolicy(
        conversational_budget_s=env_float(
            "OUTBOX_RETRY_BUDGET_CONVERSATIONAL_SECONDS", 900.0, minimum=1.0, maximum=30 * 86_400.0
        ),
        compliance_budget_s=env_float(
            "OUTBOX_RETRY_BUDGET_COMPLIANCE_SECONDS", 86_400.0, minimum=1.0, maximum=30 * 86_400.0
        ),
        max_attempts=env_int("OUTBOX_MAX_ATTEMPTS", 0, minimum=0, maximum=100_000),
        base_s=env_float("OUTBOX_BACKOFF_BASE_SECONDS", 1.0, minimum=0.001, maximum=3600.0),
        multiplier=env_float("OUTBOX_BACKOFF_MULTIPLIER", 2.0, minimum=1.0, maximum=10.0),
        cap_s=env_float("OUTBOX_BACKOFF_CAP_SECONDS", 30.0, minimum=0.001, maximum=86400.0),
        retry_after_cap_s=env_float(
            "OUTBOX_RETRY_AFTER_CAP_SECONDS", 300.0, minimum=0.0, maximum=86400.0
        ),
    )


def _worker_config() -> WorkerConfig:
    rate = env_float("OUTBOX_RATE_LIMIT_PER_SENDER", 80.0, minimum=0.0, maximum=100_000.0)
    lease_s = env_float("OUTBOX_LEASE_SECONDS", 60.0, minimum=1.0, maximum=3600.0)
    send_timeout_s = env_float("OUTBOX_SEND_TIMEOUT_SECONDS", 10.0, minimum=0.1, maximum=120.0)
    if lease_s < 2 * send_timeout_s:
        # A lease must outlive a send by far, or a slow send would be reclaimed mid-flight.
        raise ConfigError("OUTBOX_LEASE_SECONDS must be at least twice OUTBOX_SEND_TIMEOUT_SECONDS")
    return WorkerConfig(
        enabled=env_bool("OUTBOX_WORKER_ENABLED", True),
        max_in_flight=env_int("OUTBOX_MAX_IN_FLIGHT", 64, minimum=1, maximum=4096),
        claim_batch=env_int("OUTBOX_CLAIM_BATCH", 200, minimum=1, maximum=5000),
        lease_s=lease_s,
        poll_interval_s=env_float("OUTBOX_POLL_INTERVAL_SECONDS", 1.0, minimum=0.01, maximum=1.0),
        flush_interval_s=env_float(
            "OUTBOX_FLUSH_INTERVAL_SECONDS", 0.005, minimum=0.0, maximum=1.0
        ),
        send_timeout_s=send_timeout_s,
        retry=_retry_policy(),
        rate_per_sender=rate,
        rate_burst=env_float("OUTBOX_RATE_LIMIT_BURST", max(rate, 1.0), minimum=1.0, maximum=1e6),
        reconcile_delay_s=env_float(
            "OUTBOX_RECONCILE_DELAY_SECONDS", 5.0, minimum=0.0, maximum=3600.0
        ),
        reconcile_clock_skew_s=env_float(
            "OUTBOX_RECONCILE_CLOCK_SKEW_SECONDS", 30.0, minimum=1.0, maximum=3600.0
        ),
        consent_retry_s=env_float("OUTBOX_CONSENT_RETRY_SECONDS", 2.0, minimum=0.01, maximum=600),
        consent_timeout_s=env_float(
            "OUTBOX_CONSENT_TIMEOUT_SECONDS", 2.0, minimum=0.05, maximum=60.0
        ),
        consent_max_age_s=env_float(
            "OUTBOX_CONSENT_MAX_AGE_SECONDS", 1.0, minimum=0.0, maximum=60.0
        ),
        whatsapp_window_s=env_float(
            "OUTBOX_WHATSAPP_WINDOW_SECONDS", 86_400.0, minimum=1.0, maximum=30 * 86_400.0
        ),
        tenant_classes=TenantClasses.parse(env_str("OUTBOX_TENANT_CLASSES", "")),
        direct_dispatch=env_bool("OUTBOX_DIRECT_DISPATCH", True),
    )


def load_config() -> Config:
    return Config(
        grpc_port=env_int("GRPC_PORT", DEFAULT_GRPC_PORT, minimum=0, maximum=65535),
        metrics_port=env_int("METRICS_PORT", DEFAULT_METRICS_PORT, minimum=0, maximum=65535),
        nats_url=env_url_list("NATS_URL", schemes=("nats", "tls")),
        routing_addr=env_address("ROUTING_ADDR", "127.0.0.1:50051"),
        seller_admin_addr=env_address("SELLER_ADMIN_ADDR", "127.0.0.1:50054"),
        channel_cache_ttl_s=env_float(
            "OUTBOX_CHANNEL_CACHE_TTL_SECONDS", 30.0, minimum=0.0, maximum=3600.0
        ),
        channel_directory_timeout_s=env_float(
            "OUTBOX_CHANNEL_DIRECTORY_TIMEOUT_SECONDS", 2.0, minimum=0.05, maximum=60.0
        ),
        public_base_url=env_url("PUBLIC_BASE_URL", schemes=("http", "https")),
        twilio_api_base_url=env_url(
            "TWILIO_API_BASE_URL", DEFAULT_TWILIO_API, schemes=("http", "https")
        ),
        twilio_accounts=_twilio_accounts(),
        worker=_worker_config(),
        status_consumer_concurrency=env_int(
            "OUTBOX_STATUS_CONSUMER_CONCURRENCY", 16, minimum=1, maximum=1024
        ),
        db_pool_size=env_int("OUTBOX_DB_POOL_SIZE", 10, minimum=2, maximum=100),
        shutdown_grace_s=env_float("SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0, maximum=300.0),
        retention=load_retention_settings(),
        finished_max_age=retention_days("OUTBOX_FINISHED_RETENTION_DAYS", 30),
    )


def worker_id(hostname: str | None = None) -> str:
    """Who holds a lease: host and PID, so operators can tell replicas apart."""
    host = hostname or os.environ.get("HOSTNAME") or os.uname().nodename
    return f"{host}:{os.getpid()}"
