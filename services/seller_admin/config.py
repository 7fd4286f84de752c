"""The seller_admin process's configuration, read once from the environment, failing fast.

The database DSNs (`DATABASE_URL`, `SERVICE_DATABASE_URL`) are read by `infra.db` and the
trusted token keys (`SNAPSELL_TRUSTED_KEYS_FILE`, `SNAPSELL_IDP_*`) by
`infra.auth.JwtVerifier.from_env`.
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.config import env_float, env_int, env_url_list
from infra.retention import RetentionSettings, load_retention_settings

DEFAULT_GRPC_PORT = 50054
DEFAULT_METRICS_PORT = 9104


@dataclass(frozen=True, slots=True)
class Config:
    grpc_port: int
    metrics_port: int
    nats_url: str
    db_pool_size: int
    # In-flight calls get this long to finish after SIGTERM.
    shutdown_grace_s: float
    # Purge of published events (RETENTION_*, EVENTS_RETENTION_DAYS).
    retention: RetentionSettings


def load_config() -> Config:
    return Config(
        grpc_port=env_int("GRPC_PORT", DEFAULT_GRPC_PORT, minimum=0, maximum=65535),
        metrics_port=env_int("METRICS_PORT", DEFAULT_METRICS_PORT, minimum=0, maximum=65535),
        nats_url=env_url_list("NATS_URL", schemes=("nats", "tls")),
        db_pool_size=env_int("SELLER_ADMIN_DB_POOL_SIZE", 10, minimum=2, maximum=100),
        shutdown_grace_s=env_float("SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0, maximum=300.0),
        retention=load_retention_settings(),
    )
