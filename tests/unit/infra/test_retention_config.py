"""Retention settings from the environment: defaults, "0 keeps forever", one-line errors."""

from __future__ import annotations

from datetime import timedelta

import pytest

from infra.config import ConfigError
from infra.retention import load_retention_settings, retention_days

NAMES = (
    "RETENTION_INTERVAL_SECONDS",
    "RETENTION_BATCH_SIZE",
    "EVENTS_RETENTION_DAYS",
    "AUDIT_RETENTION_DAYS",
)


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_purge_hourly_in_batches_of_1000_keeping_a_week_of_events() -> None:
    settings = load_retention_settings()
    assert settings.interval_s == 3600.0
    assert settings.batch_size == 1000
    assert settings.events_max_age == timedelta(days=7)
    assert settings.audit_max_age == timedelta(days=400)


def test_audit_events_have_their_own_retention(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("EVENTS_RETENTION_DAYS", "1")
    environment.setenv("AUDIT_RETENTION_DAYS", "730")
    settings = load_retention_settings()
    assert (settings.events_max_age, settings.audit_max_age) == (
        timedelta(days=1),
        timedelta(days=730),
    )
    environment.setenv("AUDIT_RETENTION_DAYS", "0")
    assert load_retention_settings().audit_max_age is None


def test_values_come_from_the_environment(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("RETENTION_INTERVAL_SECONDS", "60")
    environment.setenv("RETENTION_BATCH_SIZE", "250")
    environment.setenv("EVENTS_RETENTION_DAYS", "30")
    settings = load_retention_settings()
    assert (settings.interval_s, settings.batch_size) == (60.0, 250)
    assert settings.events_max_age == timedelta(days=30)


def test_zero_days_keeps_rows_forever(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("EVENTS_RETENTION_DAYS", "0")
    assert load_retention_settings().events_max_age is None
    environment.setenv("SOME_RETENTION_DAYS", "0")
    assert retention_days("SOME_RETENTION_DAYS", 30) is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RETENTION_BATCH_SIZE", "0", "RETENTION_BATCH_SIZE must be between 1 and 100000"),
        ("RETENTION_INTERVAL_SECONDS", "soon", "RETENTION_INTERVAL_SECONDS must be a number"),
        ("EVENTS_RETENTION_DAYS", "-1", "EVENTS_RETENTION_DAYS must be between 0 and 3650"),
        ("EVENTS_RETENTION_DAYS", "7.5", "EVENTS_RETENTION_DAYS must be an integer"),
    ],
)
def test_malformed_values_fail_fast(
    environment: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    environment.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        load_retention_settings()


def test_a_floor_allows_zero_but_not_less_than_the_floor(
    environment: pytest.MonkeyPatch,
) -> None:
    environment.setenv("LEDGER_RETENTION_DAYS", "3")
    with pytest.raises(ConfigError, match="must be 0 \\(keep forever\\) or at least 8, got 3"):
        retention_days("LEDGER_RETENTION_DAYS", 30, minimum=8)
    environment.setenv("LEDGER_RETENTION_DAYS", "8")
    assert retention_days("LEDGER_RETENTION_DAYS", 30, minimum=8) == timedelta(days=8)
