"""The pure live-session rules: the inactivity window, idleness, the clock, request values."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.live_session import domain
from services.live_session.domain import (
    CloseReason,
    InvalidRequestError,
    LiveSession,
    ManualClock,
    SessionStatus,
)

NOON = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=45)


def session(
    last_activity_at: datetime, status: SessionStatus = SessionStatus.ACTIVE
) -> LiveSession:
    return LiveSession(uuid.uuid4(), "shop-1", status, NOON, last_activity_at)


@pytest.mark.parametrize("minutes", [1, 45, 1440])
def test_window_accepts_1_to_1440_minutes(minutes: int) -> None:
    assert domain.inactivity_window(minutes) == timedelta(minutes=minutes)


@pytest.mark.parametrize("minutes", [0, -5, 1441, 10_000])
def test_window_outside_1_to_1440_minutes_is_refused_with_one_line(minutes: int) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        domain.inactivity_window(minutes)
    assert str(caught.value) == (
        f"inactivity window must be between 1 and 1440 minutes, got {minutes}"
    )


@pytest.mark.parametrize("minutes", [True, 4.5, "45"])
def test_window_must_be_whole_minutes(minutes: object) -> None:
    with pytest.raises(InvalidRequestError, match="whole minutes"):
        domain.inactivity_window(minutes)  # type: ignore[arg-type]


def test_a_session_is_idle_from_exactly_one_window_after_its_last_activity() -> None:
    assert not domain.is_idle(NOON, NOON + WINDOW - timedelta(microseconds=1), WINDOW)
    assert domain.is_idle(NOON, NOON + WINDOW, WINDOW)
    assert domain.idle_cutoff(NOON + WINDOW, WINDOW) == NOON


def test_current_means_active_and_not_idle() -> None:
    assert domain.is_current(session(NOON), NOON + timedelta(minutes=44), WINDOW)
    assert not domain.is_current(session(NOON), NOON + WINDOW, WINDOW)
    closed = session(NOON, SessionStatus.CLOSED)
    assert not domain.is_current(closed, NOON, WINDOW)


def test_manual_close_of_an_idle_session_records_idle_as_the_reason() -> None:
    assert domain.manual_close_reason(session(NOON), NOON + WINDOW, WINDOW) is CloseReason.IDLE
    early = NOON + timedelta(minutes=1)
    assert domain.manual_close_reason(session(NOON), early, WINDOW) is CloseReason.MANUAL


def test_duration_is_known_once_closed() -> None:
    open_session = session(NOON)
    assert open_session.duration is None
    closed = LiveSession(
        open_session.id,
        "shop-1",
        SessionStatus.CLOSED,
        NOON,
        NOON,
        NOON + timedelta(minutes=50),
        CloseReason.IDLE,
    )
    assert closed.duration == timedelta(minutes=50)


def test_manual_clock_moves_only_forward_when_told() -> None:
    clock = ManualClock(NOON)
    assert clock.now() == clock.now() == NOON
    assert clock.advance(timedelta(minutes=3)) == NOON + timedelta(minutes=3)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(timedelta(seconds=-1))
    with pytest.raises(ValueError, match="timezone-aware"):
        ManualClock(datetime(2026, 1, 1))


def test_system_clock_is_timezone_aware() -> None:
    assert domain.SystemClock().now().tzinfo is not None


@pytest.mark.parametrize("value", ["", " shop", "shop ", "a\nb", "x" * 129])
def test_bad_tenant_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidRequestError, match="tenant_id"):
        domain.tenant_id(value)


def test_tenant_ids_up_to_128_printable_characters_are_accepted() -> None:
    assert domain.tenant_id("shop-1") == "shop-1"
    assert domain.tenant_id("t" * 128) == "t" * 128


def test_session_id_must_be_a_uuid() -> None:
    value = uuid.uuid4()
    assert domain.session_id(str(value)) == value
    with pytest.raises(InvalidRequestError, match="required"):
        domain.session_id("")
    with pytest.raises(InvalidRequestError, match="not a UUID"):
        domain.session_id("42")


def test_correlation_id_is_bounded() -> None:
    assert domain.correlation_id("x" * 256) == "x" * 256
    with pytest.raises(InvalidRequestError, match="at most 256"):
        domain.correlation_id("x" * 257)
