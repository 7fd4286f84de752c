"""Live-session rules, free of I/O.

A tenant's session is *current* while it is active and its last activity lies within the
inactivity window. One window governs every rule (Touch reuse, GetCurrentSession, the sweeper,
a manual close of a session already gone idle), so a session can never be current for one rule
and idle for another: idle means `last_activity_at <= now - window`.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

MIN_WINDOW_MINUTES = 1
MAX_WINDOW_MINUTES = 1440
DEFAULT_WINDOW_MINUTES = 45
MAX_TENANT_ID_CHARS = 128
MAX_CORRELATION_ID_CHARS = 256


class InvalidRequestError(ValueError):
    """A request value breaks a rule; the message is one line, safe to return to the caller."""


class SessionStatus(enum.StrEnum):
    ACTIVE = "active"
    CLOSED = "closed"


class CloseReason(enum.StrEnum):
    IDLE = "idle"
    MANUAL = "manual"


class SignalKind(enum.StrEnum):
    SELLER_MESSAGE = "seller_message"
    CLIENT_ITEM_CODE = "client_item_code"


@dataclass(frozen=True, slots=True)
class LiveSession:
    id: uuid.UUID
    tenant_id: str
    status: SessionStatus
    started_at: datetime
    last_activity_at: datetime
    closed_at: datetime | None = None
    close_reason: CloseReason | None = None

    @property
    def duration(self) -> timedelta | None:
        """How long the session lasted; None while it is active."""
        return None if self.closed_at is None else self.closed_at - self.started_at


# --- time ------------------------------------------------------------------------------------


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that only moves when told to, so tests control idleness without sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = _utc(start or datetime(2026, 1, 1, 12, 0, tzinfo=UTC))

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> datetime:
        if delta < timedelta(0):
            raise ValueError("a clock does not move backwards")
        self._now = _utc(self._now + delta)
        return self._now


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return moment.astimezone(UTC)


# --- the inactivity window -------------------------------------------------------------------


def inactivity_window(minutes: int) -> timedelta:
    """The window as a timedelta, or InvalidRequestError when outside 1-1440 minutes."""
    if isinstance(minutes, bool) or not isinstance(minutes, int):
        raise InvalidRequestError(f"inactivity window must be whole minutes, got {minutes!r}")
    if not MIN_WINDOW_MINUTES <= minutes <= MAX_WINDOW_MINUTES:
        raise InvalidRequestError(
            f"inactivity window must be between {MIN_WINDOW_MINUTES} and "
            f"{MAX_WINDOW_MINUTES} minutes, got {minutes}"
        )
    return timedelta(minutes=minutes)


def idle_cutoff(now: datetime, window: timedelta) -> datetime:
    """Sessions whose last activity is at or before this instant are idle."""
    return now - window


def is_idle(last_activity_at: datetime, now: datetime, window: timedelta) -> bool:
    return last_activity_at <= idle_cutoff(now, window)


def is_current(session: LiveSession, now: datetime, window: timedelta) -> bool:
    return session.status is SessionStatus.ACTIVE and not is_idle(
        session.last_activity_at, now, window
    )


def manual_close_reason(session: LiveSession, now: datetime, window: timedelta) -> CloseReason:
    """A manual close of a session already idle records why it really ended: idleness."""
    if is_idle(session.last_activity_at, now, window):
        return CloseReason.IDLE
    return CloseReason.MANUAL


# --- request values --------------------------------------------------------------------------


def tenant_id(value: str) -> str:
    if not value:
        raise InvalidRequestError("tenant_id is required")
    if len(value) > MAX_TENANT_ID_CHARS or not value.isprintable() or value.strip() != value:
        raise InvalidRequestError(
            f"tenant_id must be 1-{MAX_TENANT_ID_CHARS} printable characters without "
            "surrounding spaces"
        )
    return value


def correlation_id(value: str) -> str:
    if len(value) > MAX_CORRELATION_ID_CHARS:
        raise InvalidRequestError(
            f"correlation_id must be at most {MAX_CORRELATION_ID_CHARS} characters"
        )
    return value


def session_id(value: str) -> uuid.UUID:
    if not value:
        raise InvalidRequestError("session_id is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidRequestError(f"session_id {value[:64]!r} is not a UUID") from None


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where the next page of a newest-first listing starts (exclusive)."""

    started_at: datetime
    session_id: uuid.UUID
