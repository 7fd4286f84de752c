"""The faults, each done to the real thing: SIGKILL of a service process (then the same command
again, same port and environment), SIGKILL of nats-server (restarted on the same store), an
immediate PostgreSQL shutdown (what `pg_ctl stop -m immediate` does: SIGQUIT to the postmaster,
no checkpoint, crash recovery on the next start, same data directory), `pg_terminate_backend`
on every session of a service's role, a cut of a service's NATS connection (`NatsLink`), and
the Twilio sandbox answering 500s, 429s with Retry-After, and timing out after accepting.

Each fault returns once what it broke is running again (a restarted process reports ready);
the services have to find their way back by themselves."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx

from infra.db import service_role
from tests.chaos.nats_link import NatsLink
from tests.support.processes import RunningService, spawn_service
from tests.support.stack import SystemStack
from tools.devstack import EmbeddedNats, EmbeddedPostgres

# Quick retries, reconciliations, redeliveries and lease expiries, so the system recovers
# from each fault within seconds; the per-sender flood limit is lifted (the load writes far
# more than 60 messages a minute from some numbers, and the gateway drops those with a 200).
FAST_RECOVERY_ENV = {
    "gateway": {"GATEWAY_SENDER_MESSAGES_PER_MINUTE": "10000000"},
    "routing": {
        "ROUTING_ACK_WAIT_SECONDS": "5",
        "ROUTING_RETRY_DELAY_CAP_SECONDS": "1",
    },
    "outbox": {
        "OUTBOX_BACKOFF_BASE_SECONDS": "0.05",
        "OUTBOX_BACKOFF_CAP_SECONDS": "0.5",
        "OUTBOX_RETRY_AFTER_CAP_SECONDS": "1",
        "OUTBOX_RECONCILE_DELAY_SECONDS": "0.3",
        "OUTBOX_RECONCILE_CLOCK_SKEW_SECONDS": "2",
        "OUTBOX_SEND_TIMEOUT_SECONDS": "1.5",
        "OUTBOX_LEASE_SECONDS": "5",
        "OUTBOX_CONSENT_RETRY_SECONDS": "0.2",
        "OUTBOX_POLL_INTERVAL_SECONDS": "0.2",
    },
}
RESTART_READY_TIMEOUT_S = 90.0
# How long NATS and PostgreSQL stay down: long enough for every client to notice. Longer than
# the outbox lease (5 s here) also tests results written after the lease ran out.
OUTAGE_S = float(os.environ.get("SNAPSELL_CHAOS_OUTAGE_SECONDS", "1.5"))
LINK_CUT_S = 3.0
LEASE_WAIT_S = 10.0
SANDBOX_HEALTHY: dict[str, Any] = {
    # Sends take a while, so an outbox process killed mid-load has some in flight.
    "latency_ms": 200,
    # Status callbacks through the gateway, so the outbox's status consumer meets the faults.
    "auto_callbacks": ["sent", "delivered"],
    "callback_delay_ms": 100,
}
# Rates per send attempt; the seed makes the sequence of outcomes repeatable.
SANDBOX_FAULTS: dict[str, Any] = {
    **SANDBOX_HEALTHY,
    "error_rate": 0.05,
    "rate_limit_rate": 0.05,
    "retry_after_s": 1,
    "timeout_after_accept_rate": 0.04,
    "timeout_s": 5,
    "seed": 8,
}


@dataclass(frozen=True)
class FaultRecord:
    kind: str
    detail: str
    at_s: float  # since the load started
    took_s: float  # until what it broke was running again
    at_utc: str  # to line it up with the services' logs and attempts


@dataclass
class ChaosWorld:
    """Everything the faults act on."""

    stack: SystemStack
    postgres: EmbeddedPostgres
    nats: EmbeddedNats
    links: Mapping[str, NatsLink]
    spare_outbox: RunningService

    def processes(self) -> list[RunningService]:
        """Every service process running now (a restart replaces the killed one)."""
        return [*self.stack.services.values(), self.spare_outbox]

    async def kill_and_restart(self, name: str) -> str:
        """SIGKILL a service of the stack, then start it again: same port, same environment."""
        killed = self.stack.services[name]
        self.stack.services[name] = await _kill_and_restart(killed)
        return f"pid {killed.pid} killed, pid {self.stack.services[name].pid} ready"

    async def kill_outbox_holding_leases(self, *, spare: bool) -> str:
        """SIGKILL an outbox process (the stack's, or the spare worker) while it holds claimed
        messages, so another worker must take them over when the leases run out, asking Twilio
        what became of them before any resend."""
        process = self.spare_outbox if spare else self.stack.services["outbox"]
        held = await self._leases_held_soon(process)
        again = await _kill_and_restart(process)
        if spare:
            self.spare_outbox = again
        else:
            self.stack.services["outbox"] = again
        return f"pid {process.pid} killed holding {held} leases, pid {again.pid} ready"

    async def _leases_held_soon(self, process: RunningService) -> int:
        """How many messages `process` holds, once it holds some (or after a while: the
        kill is the fault; holding leases only makes it bite harder)."""
        conn = await asyncpg.connect(self.postgres.dsn)
        try:
            deadline = time.monotonic() + LEASE_WAIT_S
            while True:
                held = int(
                    await conn.fetchval(
                        "SELECT count(*) FROM outbox.messages"
                        " WHERE status = 'sending' AND lease_owner LIKE $1",
                        f"%:{process.pid}",
                    )
                )
                if held or time.monotonic() > deadline:
                    return held
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    async def crash_nats(self) -> str:
        pid = self.nats.pid
        await asyncio.to_thread(self.nats.kill)
        await asyncio.sleep(OUTAGE_S)  # the outage itself
        await asyncio.to_thread(self.nats.start)
        return f"nats-server pid {pid} killed, pid {self.nats.pid} up on the same store"

    async def crash_postgres(self) -> str:
        pid = self.postgres.pid
        await asyncio.to_thread(self.postgres.stop, "immediate")
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(self.postgres.start)
        return f"postmaster pid {pid} stopped (immediate), pid {self.postgres.pid} recovered"

    async def terminate_sessions(self, *services: str) -> str:
        """`pg_terminate_backend` on every connection of these services' roles."""
        roles = [service_role(service) for service in services]
        conn = await asyncpg.connect(self.postgres.dsn)
        try:
            rows = await conn.fetch(
                "SELECT usename, count(*) FILTER (WHERE pg_terminate_backend(pid)) AS ended"
                " FROM pg_stat_activity WHERE usename = ANY($1::text[]) GROUP BY usename"
                " ORDER BY usename",
                roles,
            )
        finally:
            await conn.close()
        ended = {row["usename"]: row["ended"] for row in rows}
        if not all(ended.get(role) for role in roles):
            raise AssertionError(f"no session to terminate for some of {roles}: {ended}")
        return ", ".join(f"{role}: {count} sessions" for role, count in ended.items())

    async def cut_nats_link(self, service: str) -> str:
        reset = await self.links[service].cut(LINK_CUT_S)
        if not reset:
            raise AssertionError(f"{service} had no NATS connection to cut")
        return f"{reset} connections reset, refused for {LINK_CUT_S:g}s"


async def configure_sandbox(sandbox_url: str, config: Mapping[str, Any]) -> None:
    """What the Twilio sandbox does from now on (faults, latency, status callbacks)."""
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.post(f"{sandbox_url}/_sandbox/faults", json=config)
    reply.raise_for_status()


async def _kill_and_restart(process: RunningService) -> RunningService:
    process.kill()
    again = spawn_service(
        process.name,
        process.env,
        port=process.port,
        http=process.http,
        log_dir=process.log_path.parent,
    )
    await again.wait_ready(timeout_s=RESTART_READY_TIMEOUT_S)
    return again


Fault = tuple[str, Callable[[], Awaitable[str]]]


def fault_plan(world: ChaosWorld) -> list[Fault]:
    """Every fault kind once, spread so each hits a different mix of work in flight."""
    return [
        ("SIGKILL routing", lambda: world.kill_and_restart("routing")),
        ("cut routing's NATS connection", lambda: world.cut_nats_link("routing")),
        ("SIGKILL outbox (API + worker)", lambda: world.kill_outbox_holding_leases(spare=False)),
        (
            "pg_terminate_backend routing + outbox + live_catalog",
            lambda: world.terminate_sessions("routing", "outbox", "live_catalog"),
        ),
        ("SIGKILL live_catalog", lambda: world.kill_and_restart("live_catalog")),
        ("SIGKILL gateway", lambda: world.kill_and_restart("gateway")),
        ("SIGKILL nats-server", world.crash_nats),
        ("PostgreSQL immediate stop", world.crash_postgres),
        ("cut gateway's NATS connection", lambda: world.cut_nats_link("gateway")),
        ("SIGKILL the second outbox worker", lambda: world.kill_outbox_holding_leases(spare=True)),
    ]


async def run_faults(
    plan: list[Fault],
    *,
    accepted: Callable[[], int],
    wait_accepted: Callable[[int], Awaitable[None]],
    total: int,
    started: float,
) -> list[FaultRecord]:
    """Strike fault i once (i + 1) / (len(plan) + 2) of the webhooks were accepted, so every
    fault hits a system under load and the last ones still leave load to recover under."""
    records: list[FaultRecord] = []
    for index, (kind, strike) in enumerate(plan):
        await wait_accepted((index + 1) * total // (len(plan) + 2))
        if accepted() >= total:
            raise AssertionError(f"the load ended before the fault {kind!r}; make it longer")
        at, at_utc = time.monotonic(), datetime.now(UTC).strftime("%H:%M:%S")
        detail = await strike()
        records.append(FaultRecord(kind, detail, at - started, time.monotonic() - at, at_utc))
    return records
