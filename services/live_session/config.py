"""The live_session process's configuration, read once from the environment, failing fast."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from infra.config import env_float, env_int, env_url_list
from infra.retention import RetentionSettings, load_retention_settings
from services.live_session.domain import (
    DEFAULT_WINDOW_MINUTES,
    MAX_WINDOW_MINUTES,
    MIN_WINDOW_MINUTES,
    inactivity_window,
)

DEFAULT_GRPC_PORT = 50053
DEFAULT_METRICS_PORT = 9103
DEFAULT_SWEEP_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class Config:
    grpc_port: int
    metrics_port: int
    nats_url: str
    # One window for Touch reuse, GetCurrentSession and the sweeper (see domain.py).
    inactivity_window: timedelta
    sweep_interval_s: float
    db_pool_size: int
    shutdown_grace_s: float
    # Purge of published events (RETENTION_*, EVENTS_RETENTION_DAYS).
    retention: RetentionSettings


def load_config() -> Config:
    minutes = env_int(
        "LIVE_SESSION_INACTIVITY_WINDOW_MINUTES",
        DEFAULT_WINDOW_MINUTES,
        minimum=MIN_WINDOW_MINUTES,
        maximum=MAX_WINDOW_MINUTES,
    )
    return Config(
        grpc_port=env_int("GRPC_PORT", DEFAULT_GRPC_PORT, minimum=0, maximum=65535),
        metrics_port=env_int("METRICS_PORT", DEFAULT_METRICS_PORT, minimum=0, maximum=65535),
        nats_url=env_url_list("NATS_URL", schemes=("nats", "tls")),
        inactivity_window=inactivity_window(minutes),
        sweep_interval_s=env_float(
            "LIVE_SESSION_SWEEP_INTERVAL_SECONDS",
            DEFAULT_SWEEP_INTERVAL_S,
            minimum=0.1,
            maximum=3600.0,
        ),
        db_pool_size=env_int("LIVE_SESSION_DB_POOL_SIZE", 10, minimum=2, maximum=100),
        shutdown_grace_s=env_float("SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0, maximum=300.0),
        retention=load_retention_settings(),
    )
