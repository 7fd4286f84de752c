"""All SQL of the live_session service (asyncpg, schema `live_session`).

Concurrency, under READ COMMITTED:
- Touch first runs one autocommit statement that bumps the tenant's current session (many
  tenants' at once when `TouchBatcher` coalesces concurrent calls). That is the common case
  (every live message after the first); row locks serialise concurrent bumps, and a bump
  that waits behind a close re-checks the row's latest version and finds nothing to bump.
- Otherwise, in one transaction: close the tenant's stale active row if any (a blocking row
  lock, so a racing sweeper or Touch closes it once), then INSERT ... ON CONFLICT on the
  partial unique index. Racing inserters wait on each other's index entry and the losers bump
  the winner's row, so every caller gets the same session. The ON CONFLICT update only bumps a
  row that is still current; when it finds a stale one (possible only with clocks that
  disagree) the conflicting row is now locked by us and the loop closes it and retries.
- The sweeper claims idle rows with FOR UPDATE SKIP LOCKED, whose re-check of the locked row's
  latest version means a row another sweeper (or a Touch) already closed is never closed twice.
Events are recorded with `infra.events.record_event` in the same transaction as the change.
"""

from __future__ import annotations

import asyncio
import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from infra.db import Connection
from infra.events import record_event
from services.live_session import events
from services.live_session.domain import (
    Clock,
    CloseReason,
    LiveSession,
    PageCursor,
    SessionStatus,
    SignalKind,
    idle_cutoff,
    manual_close_reason,
)

_COLUMNS = "id, tenant_id, status, started_at, last_activity_at, closed_at, close_reason"
_QUALIFIED_COLUMNS = ", ".join(f"s.{column.strip()}" for column in _COLUMNS.split(","))

# Rows are locked in tenant order (LockRows runs above the Sort), so two of these statements
# with overlapping tenants, from one replica or several, cannot deadlock.
_BUMP_CURRENT = f"""
WITH current AS (
    SELECT id FROM sessions
    WHERE tenant_id = ANY($1::text[]) AND status = 'active' AND last_activity_at > $3
    ORDER BY tenant_id
    FOR UPDATE
)
UPDATE sessions AS s SET last_activity_at = GREATEST(s.last_activity_at, $2)
FROM current WHERE s.id = current.id
RETURNING {_QUALIFIED_COLUMNS}
"""

_CLOSE_STALE = f"""
UPDATE sessions SET status = 'closed', closed_at = $2, close_reason = 'idle'
WHERE tenant_id = $1 AND status = 'active' AND last_activity_at <= $3
RETURNING {_COLUMNS}
"""

_OPEN_OR_BUMP = f"""
INSERT INTO sessions (id, tenant_id, status, started_at, last_activity_at)
VALUES ($1, $2, 'active', $3, $3)
ON CONFLICT (tenant_id) WHERE status = 'active'
DO UPDATE SET last_activity_at = GREATEST(sessions.last_activity_at, EXCLUDED.last_activity_at)
WHERE sessions.last_activity_at > $4
RETURNING {_COLUMNS}
"""

_CURRENT = f"""
SELECT {_COLUMNS} FROM sessions
WHERE tenant_id = $1 AND status = 'active' AND last_activity_at > $2
"""

_LOCK_SESSION = f"SELECT {_COLUMNS} FROM sessions WHERE id = $1 AND tenant_id = $2 FOR UPDATE"

_CLOSE = f"""
UPDATE sessions SET status = 'closed', closed_at = $2, close_reason = $3
WHERE id = $1
RETURNING {_COLUMNS}
"""

_LIST = f"""
SELECT {_COLUMNS} FROM sessions
WHERE tenant_id = $1
  AND ($2::text IS NULL OR status = $2)
  AND ($3::timestamptz IS NULL OR (started_at, id) < ($3, $4::uuid))
ORDER BY started_at DESC, id DESC
LIMIT $5
"""

# MATERIALIZED: the locking scan must run exactly once per statement.
_CLOSE_IDLE_BATCH = f"""
WITH idle AS MATERIALIZED (
    SELECT id FROM sessions
    WHERE status = 'active' AND last_activity_at <= $1
    ORDER BY last_activity_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE sessions AS s SET status = 'closed', closed_at = $2, close_reason = 'idle'
FROM idle WHERE s.id = idle.id
RETURNING {_QUALIFIED_COLUMNS}
"""

# Served by the partial index on active sessions' last activity (the sweeper's).
_COUNT_LIVE = "SELECT count(*) FROM sessions WHERE status = 'active' AND last_activity_at > $1"

# Only clocks that disagree by more than the window can make the ON CONFLICT path meet a stale
# row twice in a row; give up loudly rather than loop.
_MAX_OPEN_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class TouchResult:
    session: LiveSession
    created: bool


@dataclass(frozen=True, slots=True)
class CloseResult:
    session: LiveSession
    closed_now: bool


@dataclass(frozen=True, slots=True)
class SessionPage:
    sessions: Sequence[LiveSession]
    next_cursor: PageCursor | None


def _session(row: asyncpg.Record) -> LiveSession:
    reason = row["close_reason"]
    return LiveSession(
        id=row["id"],
        tenant_id=row["tenant_id"],
        status=SessionStatus(row["status"]),
        started_at=row["started_at"],
        last_activity_at=row["last_activity_at"],
        closed_at=row["closed_at"],
        close_reason=None if reason is None else CloseReason(reason),
    )


class SessionStore:
    """Live sessions of every tenant; "now" always comes from the injected clock."""

    def __init__(self, pool: asyncpg.Pool, clock: Clock, window: timedelta) -> None:
        self._pool = pool
        self._clock = clock
        self._window = window

    @property
    def window(self) -> timedelta:
        return self._window

    async def touch(
        self, tenant_id: str, signal_kind: SignalKind, correlation_id: str
    ) -> TouchResult:
        """The tenant's current session, bumped; or a new one (closing a stale one)."""
        bumped = await self.bump_current([tenant_id])
        if tenant_id in bumped:
            return TouchResult(bumped[tenant_id], created=False)
        return await self.open_session(tenant_id, signal_kind, correlation_id)

    async def extend(self, tenant_id: str) -> LiveSession | None:
        """The tenant's current session, bumped; None when it has none (never opens one)."""
        return (await self.bump_current([tenant_id])).get(tenant_id)

    async def bump_current(self, tenant_ids: Sequence[str]) -> dict[str, LiveSession]:
        """Bump the last activity of each tenant's current session, all in one statement;
        tenants without a current session are absent from the result."""
        now = self._clock.now()
        rows = await self._pool.fetch(
            _BUMP_CURRENT, tenant_ids, now, idle_cutoff(now, self._window)
        )
        return {row["tenant_id"]: _session(row) for row in rows}

    async def open_session(
        self, tenant_id: str, signal_kind: SignalKind, correlation_id: str
    ) -> TouchResult:
        """Touch for a tenant that had no current session a moment ago: close its stale
        session if any and open one, or bump the one a concurrent caller just opened."""
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            return await self._close_stale_and_open(
                conn, tenant_id, signal_kind, correlation_id, now, idle_cutoff(now, self._window)
            )

    async def _close_stale_and_open(
        self,
        conn: Connection,
        tenant_id: str,
        signal_kind: SignalKind,
        correlation_id: str,
        now: datetime,
        cutoff: datetime,
    ) -> TouchResult:
        new_id = uuid.uuid4()
        for _ in range(_MAX_OPEN_ATTEMPTS):
            stale = await conn.fetchrow(_CLOSE_STALE, tenant_id, now, cutoff)
            if stale is not None:
                await _record_closed(conn, _session(stale), correlation_id)
            row = await conn.fetchrow(_OPEN_OR_BUMP, new_id, tenant_id, now, cutoff)
            if row is None:
                continue  # met a stale row that is now ours to close
            session = _session(row)
            created = session.id == new_id
            if created:
                await record_event(
                    conn,
                    subject=events.SESSION_CREATED_SUBJECT,
                    message=events.session_created(session, signal_kind, correlation_id),
                    aggregate_id=str(session.id),
                    tenant_id=tenant_id,
                )
            return TouchResult(session, created=created)
        raise RuntimeError(f"touch of tenant {tenant_id!r} kept meeting stale sessions")

    async def current(self, tenant_id: str) -> LiveSession | None:
        cutoff = idle_cutoff(self._clock.now(), self._window)
        row = await self._pool.fetchrow(_CURRENT, tenant_id, cutoff)
        return None if row is None else _session(row)

    async def close(
        self, tenant_id: str, session_id: uuid.UUID, correlation_id: str
    ) -> CloseResult | None:
        """Close by hand; None when the tenant has no such session. Closing a closed session
        changes nothing."""
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_LOCK_SESSION, session_id, tenant_id)
            if row is None:
                return None
            session = _session(row)
            if session.status is SessionStatus.CLOSED:
                return CloseResult(session, closed_now=False)
            reason = manual_close_reason(session, now, self._window)
            closed_row = await conn.fetchrow(_CLOSE, session_id, now, reason.value)
            assert closed_row is not None  # locked above
            closed = _session(closed_row)
            await _record_closed(conn, closed, correlation_id)
            return CloseResult(closed, closed_now=True)

    async def list(
        self,
        tenant_id: str,
        status: SessionStatus | None,
        limit: int,
        after: PageCursor | None = None,
    ) -> SessionPage:
        rows = await self._pool.fetch(
            _LIST,
            tenant_id,
            None if status is None else status.value,
            None if after is None else after.started_at,
            None if after is None else after.session_id,
            limit + 1,
        )
        sessions = [_session(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = sessions[-1]
            next_cursor = PageCursor(started_at=last.started_at, session_id=last.id)
        return SessionPage(sessions, next_cursor)

    async def close_idle_batch(self, batch: int = 100) -> builtins.list[LiveSession]:
        """Close up to `batch` sessions idle past the window, with their events, in one
        transaction; rows another sweeper holds are skipped, not waited for."""
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLOSE_IDLE_BATCH, idle_cutoff(now, self._window), now, batch)
            closed = [_session(row) for row in rows]
            for session in closed:
                await _record_closed(conn, session, correlation_id="")
        return closed

    async def count_live(self) -> int:
        """Sessions live right now (active and inside the window), for the metrics gauge."""
        cutoff = idle_cutoff(self._clock.now(), self._window)
        return int(await self._pool.fetchval(_COUNT_LIVE, cutoff))

    async def close_idle_sessions(
        self, batch: int = 100, *, stop: asyncio.Event | None = None
    ) -> int:
        """Close every session idle past the window, `batch` per transaction, until none
        remain (or `stop` is set between batches); returns how many this call closed."""
        total = 0
        while stop is None or not stop.is_set():
            closed = await self.close_idle_batch(batch)
            total += len(closed)
            if len(closed) < batch:
                break
        return total


async def _record_closed(conn: Connection, session: LiveSession, correlation_id: str) -> None:
    await record_event(
        conn,
        subject=events.SESSION_CLOSED_SUBJECT,
        message=events.session_closed(session, correlation_id),
        aggregate_id=str(session.id),
        tenant_id=session.tenant_id,
    )
