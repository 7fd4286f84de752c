"""A Hypothesis state machine drives the real store (real PostgreSQL) with touch / advance the
clock / sweep / close / get / list, and checks every answer and the whole table, events
included, against a plain in-memory model of the rules after every step."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from infra.db import create_pool
from services.live_session.domain import CloseReason, ManualClock, SessionStatus, SignalKind
from services.live_session.store import SessionStore
from services.live_session.touch_batcher import TouchBatcher

WINDOW = timedelta(minutes=10)
TENANTS = ("shop-a", "shop-b")
# Exact window boundaries are where off-by-one rules diverge, so they are drawn often.
BOUNDARY_STEPS = (
    WINDOW,
    WINDOW - timedelta(microseconds=1),
    timedelta(microseconds=1),
    timedelta(0),
)
T = TypeVar("T")


@dataclass
class ModelSession:
    id: uuid.UUID
    tenant_id: str
    started_at: datetime
    last_activity_at: datetime
    status: SessionStatus = SessionStatus.ACTIVE
    closed_at: datetime | None = None
    close_reason: CloseReason | None = None

    def idle(self, now: datetime) -> bool:
        return self.last_activity_at <= now - WINDOW

    def close(self, now: datetime, reason: CloseReason) -> None:
        self.status, self.closed_at, self.close_reason = SessionStatus.CLOSED, now, reason


class LiveSessionMachine(RuleBasedStateMachine):
    # Set by the test: one event loop and pool for every example (pools are bound to a loop).
    runner: asyncio.Runner
    pool: asyncpg.Pool

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.store = SessionStore(self.pool, self.clock, WINDOW)
        # Touch goes through the batcher, as the API's does.
        self.toucher = TouchBatcher(self.store)
        self.sessions: dict[uuid.UUID, ModelSession] = {}
        self.run(self.pool.execute("TRUNCATE sessions, events"))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    def active(self, tenant_id: str) -> ModelSession | None:
        found = [
            s
            for s in self.sessions.values()
            if s.tenant_id == tenant_id and s.status is SessionStatus.ACTIVE
        ]
        assert len(found) <= 1
        return found[0] if found else None

    @initialize()
    def every_tenant_is_live(self) -> None:
        # Short runs are the norm; starting with live sessions lets every step matter.
        for tenant_id in TENANTS:
            self.touch(tenant_id, SignalKind.SELLER_MESSAGE)

    @rule(tenant_id=st.sampled_from(TENANTS), kind=st.sampled_from(SignalKind))
    def touch(self, tenant_id: str, kind: SignalKind) -> None:
        now = self.clock.now()
        result = self.run(self.toucher.touch(tenant_id, kind, "c"))
        active = self.active(tenant_id)
        if active is not None and not active.idle(now):
            assert not result.created and result.session.id == active.id
            active.last_activity_at = max(active.last_activity_at, now)
            return
        if active is not None:
            active.close(now, CloseReason.IDLE)
        assert result.created and result.session.id not in self.sessions
        self.sessions[result.session.id] = ModelSession(result.session.id, tenant_id, now, now)

    @rule(
        step=st.one_of(
            st.sampled_from(BOUNDARY_STEPS),
            st.integers(min_value=1, max_value=15 * 60).map(lambda s: timedelta(seconds=s)),
        )
    )
    def advance(self, step: timedelta) -> None:
        self.clock.advance(step)

    @rule(
        tenant_id=st.sampled_from(TENANTS),
        offset_us=st.sampled_from([-1, 0, 1]),
        then=st.sampled_from(["touch", "sweep", "get", "close"]),
    )
    def act_at_idle_boundary(self, tenant_id: str, offset_us: int, then: str) -> None:
        """Move the clock to just before, exactly at, or just past the moment the tenant's
        active session goes idle, and act there: where an off-by-one rule would diverge."""
        active = self.active(tenant_id)
        if active is None:
            return
        target = active.last_activity_at + WINDOW + timedelta(microseconds=offset_us)
        if target > self.clock.now():
            self.clock.advance(target - self.clock.now())
        if then == "touch":
            self.touch(tenant_id, SignalKind.SELLER_MESSAGE)
        elif then == "sweep":
            self.sweep(batch=2)
        elif then == "get":
            self.get_current(tenant_id)
        else:
            self.close_session(tenant_id, active.id)

    @rule(batch=st.integers(min_value=1, max_value=4))
    def sweep(self, batch: int) -> None:
        now = self.clock.now()
        expected = {
            s.id for s in self.sessions.values() if s.status is SessionStatus.ACTIVE and s.idle(now)
        }
        assert self.run(self.store.close_idle_sessions(batch)) == len(expected)
        for session_id in expected:
            self.sessions[session_id].close(now, CloseReason.IDLE)

    @rule(tenant_id=st.sampled_from(TENANTS), pick=st.integers(min_value=0, max_value=20))
    def close(self, tenant_id: str, pick: int) -> None:
        known = sorted(self.sessions)
        # Mostly real sessions (of any tenant, so cross-tenant closes are tried), sometimes none.
        session_id = known[pick % len(known)] if known and pick < 18 else uuid.uuid4()
        self.close_session(tenant_id, session_id)

    def close_session(self, tenant_id: str, session_id: uuid.UUID) -> None:
        now = self.clock.now()
        result = self.run(self.store.close(tenant_id, session_id, "m"))
        model = self.sessions.get(session_id)
        if model is None or model.tenant_id != tenant_id:
            assert result is None
            return
        assert result is not None
        assert result.closed_now == (model.status is SessionStatus.ACTIVE)
        if result.closed_now:
            model.close(now, CloseReason.IDLE if model.idle(now) else CloseReason.MANUAL)

    @rule(tenant_id=st.sampled_from(TENANTS))
    def get_current(self, tenant_id: str) -> None:
        current = self.run(self.store.current(tenant_id))
        active = self.active(tenant_id)
        if active is None or active.idle(self.clock.now()):
            assert current is None
        else:
            assert current is not None and current.id == active.id

    @rule(tenant_id=st.sampled_from(TENANTS), page_size=st.integers(min_value=1, max_value=3))
    def list_all(self, tenant_id: str, page_size: int) -> None:
        listed: list[uuid.UUID] = []
        cursor = None
        while True:
            page = self.run(self.store.list(tenant_id, None, page_size, cursor))
            listed += [s.id for s in page.sessions]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        mine = [s for s in self.sessions.values() if s.tenant_id == tenant_id]
        mine.sort(key=lambda s: (s.started_at, s.id), reverse=True)
        assert listed == [s.id for s in mine]

    @invariant()
    def table_and_events_match_the_model(self) -> None:
        rows = self.run(
            self.pool.fetch(
                "SELECT id, tenant_id, status, started_at, last_activity_at, closed_at,"
                " close_reason FROM sessions"
            )
        )
        stored = {
            row["id"]: (
                row["tenant_id"],
                row["status"],
                row["started_at"],
                row["last_activity_at"],
                row["closed_at"],
                row["close_reason"],
            )
            for row in rows
        }
        expected = {
            s.id: (
                s.tenant_id,
                s.status.value,
                s.started_at,
                s.last_activity_at,
                s.closed_at,
                None if s.close_reason is None else s.close_reason.value,
            )
            for s in self.sessions.values()
        }
        assert stored == expected
        events = self.run(
            self.pool.fetch(
                "SELECT subject, aggregate_id, count(*) AS n FROM events"
                " GROUP BY subject, aggregate_id"
            )
        )
        counted = {
            (row["subject"].rsplit(".", 1)[-1], row["aggregate_id"]): row["n"] for row in events
        }
        wanted = {("created", str(s.id)): 1 for s in self.sessions.values()}
        wanted |= {
            ("closed", str(s.id)): 1
            for s in self.sessions.values()
            if s.status is SessionStatus.CLOSED
        }
        assert counted == wanted


def test_store_follows_the_model(service_dsn: str) -> None:
    # Hypothesis drives rules synchronously, so the test runs its own loop (not installed as
    # the current one, which would disturb the session loop of the async tests).
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        pool = runner.run(create_pool(service_dsn, "live_session", min_size=1, max_size=2))
        LiveSessionMachine.runner = runner
        LiveSessionMachine.pool = pool
        try:
            run_state_machine_as_test(
                LiveSessionMachine,
                settings=settings(
                    max_examples=30,
                    stateful_step_count=20,
                    deadline=None,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
        finally:
            runner.run(pool.close())
