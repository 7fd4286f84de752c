"""A Hypothesis state machine drives the real store (real PostgreSQL) with claims, cancels,
stock changes, confirmations and hold expiry on one item, and checks the item's counters and
every client's reservation against a plain in-memory model of the rules after every step."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import timedelta
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
from services.live_catalog.domain import SettingsBook
from services.live_catalog.store import CatalogStore
from tests.integration.live_catalog.conftest import HOLD, ManualClock, inbound

CLIENTS = tuple(f"+3361000000{n}" for n in range(6))
MAX_PER_CLIENT = 2
T = TypeVar("T")


@dataclass
class ModelReservation:
    status: str  # held, waiting, confirmed
    quantity: int
    arrival: int


class CatalogMachine(RuleBasedStateMachine):
    # Set by the test: one event loop and pool for every example (pools are bound to a loop).
    runner: asyncio.Runner
    pool: asyncpg.Pool

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.store = CatalogStore(
            self.pool,
            self.clock,
            hold=HOLD,
            settings=SettingsBook(),
            default_max_per_client=MAX_PER_CLIENT,
        )
        self.tenant, self.session = f"model-{uuid.uuid4().hex[:8]}", uuid.uuid4()
        self.stock = 0
        self.live: dict[str, ModelReservation] = {}
        self.arrivals = 0

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    def send(self, body: str, sender: str, *, seller: bool = False) -> str:
        self.arrivals += 1
        message = inbound(
            body,
            tenant=self.tenant,
            session=self.session,
            sender=sender,
            seller=seller,
            at=self.clock.now + timedelta(microseconds=self.arrivals),
        )
        return self.run(self.store.handle_inbound(message))

    def units(self, *statuses: str) -> int:
        return sum(r.quantity for r in self.live.values() if r.status in statuses)

    def promote(self) -> None:
        for client, waiter in sorted(self.live.items(), key=lambda kv: kv[1].arrival):
            if waiter.status != "waiting":
                continue
            if self.units("held", "confirmed") + waiter.quantity > self.stock:
                return  # first come, first served: nobody overtakes the head
            waiter.status = "held"
            self.live[client] = waiter

    @initialize(stock=st.integers(min_value=0, max_value=3))
    def post(self, stock: int) -> None:
        body = f"A12 Robe 25€ x{stock}" if stock else "A12 Robe 25€"
        assert self.send(body, CLIENTS[0], seller=True) == "seller_posted"
        self.stock = stock or 1

    @rule(client=st.sampled_from(CLIENTS), quantity=st.integers(min_value=1, max_value=3))
    def claim(self, client: str, quantity: int) -> None:
        outcome = self.send("A12" if quantity == 1 else f"A12 x{quantity}", client)
        mine = self.live.get(client)
        if quantity > MAX_PER_CLIENT:
            expected = "over_limit"
        elif mine is not None:
            expected = "already_waiting" if mine.status == "waiting" else "already_held"
        elif self.units("held") == 0 and self.units("confirmed") >= self.stock:
            expected = "sold_out"
        elif (
            self.units("held", "confirmed") + quantity <= self.stock and self.units("waiting") == 0
        ):
            expected = "held"
            self.live[client] = ModelReservation("held", quantity, self.arrivals)
        else:
            expected = "waiting"
            self.live[client] = ModelReservation("waiting", quantity, self.arrivals)
        assert outcome == expected

    @rule(client=st.sampled_from(CLIENTS))
    def cancel(self, client: str) -> None:
        outcome = self.send("ANNULER A12", client)
        mine = self.live.get(client)
        if mine is None:
            assert outcome == "nothing_to_cancel"
        elif mine.status == "confirmed":
            assert outcome == "confirmed_cannot_cancel"
        else:
            assert outcome == "cancelled"
            del self.live[client]
            self.promote()

    @rule(stock=st.integers(min_value=0, max_value=5))
    def set_stock(self, stock: int) -> None:
        outcome = self.send(f"A12 stock {stock}", CLIENTS[0], seller=True)
        if stock < self.units("held", "confirmed"):
            assert outcome == "seller_stock_refused"
            return
        assert outcome == "seller_stock"
        self.stock = stock
        self.promote()

    @rule(client=st.sampled_from(CLIENTS))
    def confirm(self, client: str) -> None:
        mine = self.live.get(client)
        if mine is None or mine.status != "held":
            return
        reservation_id = self.run(
            self.pool.fetchval(
                "SELECT id FROM reservations WHERE client_value = $1 AND status = 'held'"
                " AND tenant_id = $2",
                client,
                self.tenant,
            )
        )
        self.run(self.store.confirm_reservation(self.tenant, reservation_id, "model"))
        mine.status = "confirmed"

    @rule()
    def holds_lapse(self) -> None:
        self.clock.advance(HOLD + timedelta(seconds=1))
        while self.run(self.store.expire_holds(batch=1))[0]:
            pass
        for client in [c for c, r in self.live.items() if r.status == "held"]:
            del self.live[client]
        self.promote()

    @invariant()
    def store_matches_model(self) -> None:
        item = self.run(
            self.pool.fetchrow(
                "SELECT stock, held, confirmed, waiting FROM items WHERE tenant_id = $1",
                self.tenant,
            )
        )
        if item is None:
            return
        assert dict(item) == {
            "stock": self.stock,
            "held": self.units("held"),
            "confirmed": self.units("confirmed"),
            "waiting": sum(r.status == "waiting" for r in self.live.values()),
        }
        rows = self.run(
            self.pool.fetch(
                "SELECT client_value, status, quantity FROM reservations"
                " WHERE tenant_id = $1 AND status <> 'released'",
                self.tenant,
            )
        )
        assert {r["client_value"]: (r["status"], r["quantity"]) for r in rows} == {
            client: (r.status, r.quantity) for client, r in self.live.items()
        }


def test_store_follows_the_model(service_dsn: str) -> None:
    # Hypothesis drives rules synchronously, so the test runs its own loop (not installed as
    # the current one, which would disturb the session loop of the async tests).
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        pool = runner.run(create_pool(service_dsn, "live_catalog", min_size=1, max_size=2))
        CatalogMachine.runner = runner
        CatalogMachine.pool = pool
        try:
            run_state_machine_as_test(
                CatalogMachine,
                settings=settings(
                    max_examples=100,
                    stateful_step_count=30,
                    deadline=None,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
        finally:
            runner.run(pool.close())
