"""The process configuration: defaults and the fail-fast, one-line errors."""

from __future__ import annotations

from datetime import timedelta

import pytest

from infra.config import ConfigError
from services.live_session.config import load_config


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "GRPC_PORT",
        "METRICS_PORT",
        "LIVE_SESSION_INACTIVITY_WINDOW_MINUTES",
        "LIVE_SESSION_SWEEP_INTERVAL_SECONDS",
        "LIVE_SESSION_DB_POOL_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:4222")
    return monkeypatch


def test_defaults() -> None:
    config = load_config()
    assert config.inactivity_window == timedelta(minutes=45)
    assert config.sweep_interval_s == 60.0
    assert (config.grpc_port, config.metrics_port) == (50053, 9103)


def test_window_and_sweep_interval_come_from_the_environment(environment) -> None:
    environment.setenv("LIVE_SESSION_INACTIVITY_WINDOW_MINUTES", "1440")
    environment.setenv("LIVE_SESSION_SWEEP_INTERVAL_SECONDS", "0.5")
    config = load_config()
    assert config.inactivity_window == timedelta(days=1)
    assert config.sweep_interval_s == 0.5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "LIVE_SESSION_INACTIVITY_WINDOW_MINUTES must be between 1 and 1440, got 0"),
        ("1441", "LIVE_SESSION_INACTIVITY_WINDOW_MINUTES must be between 1 and 1440, got 1441"),
        ("45m", "LIVE_SESSION_INACTIVITY_WINDOW_MINUTES must be an integer, got '45m'"),
    ],
)
def test_a_window_outside_1_to_1440_fails_fast(environment, value: str, message: str) -> None:
    environment.setenv("LIVE_SESSION_INACTIVITY_WINDOW_MINUTES", value)
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert str(caught.value) == message


def test_missing_nats_url_fails_fast(environment) -> None:
    environment.delenv("NATS_URL")
    with pytest.raises(ConfigError, match="NATS_URL is required"):
        load_config()
