"""Issue #24's restore drill: while the whole system runs under load, PostgreSQL archives its WAL
and a base backup is taken; a second wave of load follows a recovery target time. A new data
directory restored from the backup and the archive to that time holds exactly what was
committed before it: every table of every service equal, row for row, to the database at the
target time, and nothing of the second wave. The services, started on the restored cluster,
answer for every message, consent change and session of the first wave (over gRPC and the
operator CLI), know nothing of the second, and go on working. `make restore-drill` runs it at
full size and prints the counts; `make test` runs it reduced (`waves.DEFAULT_*`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import asyncpg
import grpc

from infra import jetstream
from tests.drills.conftest import DRILL_ENV
from tests.drills.pitr import (
    BackupSite,
    DatabaseState,
    archive_current_wal,
    next_transaction_id,
    restored_cluster,
    row_counts,
    state,
    state_at_now,
)
from tests.drills.waves import DrillSize, Traffic, Wave
from tests.e2e.harness import Harness, eventually
from tests.support.stack import DB_SERVICES, SystemStack, start_system
from tools.devstack import EmbeddedNats, EmbeddedPostgres


async def test_a_point_in_time_restore_brings_back_exactly_what_was_committed_before_it(
    source_postgres: EmbeddedPostgres,
    source_system: SystemStack,
    drill_nats: EmbeddedNats,
    backup_site: BackupSite,
    traffic: Traffic,
    drill_dir: Path,
) -> None:
    size = DrillSize.from_env()
    phases: dict[str, float] = {}  # seconds each took
    next_xid: dict[str, int] = {}  # at the backup's start and end, at the target time

    async def base_backup() -> None:
        next_xid["backup start"] = await next_transaction_id(source_postgres.dsn)
        with _timed(phases, "base backup"):
            await asyncio.to_thread(backup_site.take_base_backup, source_postgres)
        next_xid["backup end"] = await next_transaction_id(source_postgres.dsn)

    with _timed(phases, "first wave"):
        first = await traffic.first_wave(size, alongside=base_backup)
    target_time, at_target = await state_at_now(source_postgres.dsn, DB_SERVICES)
    next_xid["target"] = await next_transaction_id(source_postgres.dsn)
    written = {
        "during the base backup": next_xid["backup end"] - next_xid["backup start"],
        "after it, before the target": next_xid["target"] - next_xid["backup end"],
    }
    # Both, or the drill would not show a backup taken under load restored through the archive.
    assert all(written.values()), written
    seen = await _what_the_apis_answer(traffic.harness, first)
    assert all(seen.opted_out[load.shop.tenant_id] == load.stoppers for load in first.opened)

    with _timed(phases, "second wave"):
        second = await traffic.second_wave(size, first.opened)
    at_end = await state(source_postgres.dsn, DB_SERVICES)
    after = await _what_the_apis_answer(traffic.harness, first)
    # The second wave changed what the first made: otherwise "nothing after" proves nothing.
    for load in first.opened:
        tenant = load.shop.tenant_id
        assert after.opted_out[tenant] != seen.opted_out[tenant]
        assert after.sessions[tenant] != seen.sessions[tenant]
    for table in ("routing.processed_inbound", "routing.consent_log", "outbox.messages"):
        assert set(at_target[table]) < set(at_end[table]), table
    await archive_current_wal(source_postgres.dsn)

    # The disaster: the writers are stopped and the cluster is gone.
    await source_system.stop()
    source_postgres.stop()
    with contextlib.ExitStack() as cleanup:
        with _timed(phases, "restore"):
            restored = cleanup.enter_context(
                restored_cluster(backup_site, drill_dir / "restored", target_time)
            )
        restored_state = await state(restored.dsn, DB_SERVICES)
        _assert_same(restored_state, at_target)
        assert await _timeline(restored.dsn) > 1, "not promoted onto a new timeline"

        with _timed(phases, "services up"):
            stack = await start_system(
                restored.dsn,
                drill_nats.url,
                source_system.keys,
                drill_dir / "restored-system",
                service_env=DRILL_ENV,
                trace=False,
                takes_over=source_system,
            )
        try:
            with _timed(phases, "services checked"):
                await _check_restored_services(stack, first, second, seen)
        finally:
            await stack.stop()

    counts = {
        "at target": row_counts(at_target),
        "at end": row_counts(at_end),
        "restored": row_counts(restored_state),
    }
    _report(size, first, second, written, target_time, phases, counts)


class _Answers:
    """What the services' APIs say about the first wave's shops and messages."""

    def __init__(self) -> None:
        self.opted_out: dict[str, frozenset[str]] = {}
        self.sessions: dict[str, list[tuple[str, int]]] = {}  # tenant -> [(id, status)]
        self.statuses: dict[str, int] = {}  # outbound message id -> status


async def _what_the_apis_answer(harness: Harness, wave: Wave) -> _Answers:
    answers = _Answers()
    for load in wave.opened:
        tenant = load.shop.tenant_id
        answers.opted_out[tenant] = frozenset(await harness.opted_out(load.shop))
        answers.sessions[tenant] = [
            (s.session_id, s.status) for s in await harness.sessions(load.shop)
        ]
    for shop, message_id in wave.enqueued:
        answers.statuses[message_id] = (await harness.message(shop, message_id)).status
    return answers


async def _check_restored_services(
    stack: SystemStack, first: Wave, second: Wave, seen: _Answers
) -> None:
    nats = await jetstream.connect(stack.nats_url, name="restore-drill-check")
    harness = Harness(stack, nats)
    try:
        restored = await _what_the_apis_answer(harness, first)
        assert restored.opted_out == seen.opted_out
        assert restored.sessions == seen.sessions
        assert restored.statuses == seen.statuses
        for shop, message_id in second.enqueued:
            try:
                await harness.message(shop, message_id)
            except grpc.aio.AioRpcError as error:
                assert error.code() is grpc.StatusCode.NOT_FOUND, error
            else:
                raise AssertionError(f"message {message_id} of the second wave came back")

        listed = stack.cli("list-tenants")
        assert listed.returncode == 0, listed.stderr
        tenants = {tenant["tenantId"] for tenant in json.loads(listed.stdout)["tenants"]}
        assert {load.shop.tenant_id for load in first.opened} <= tenants
        assert not {load.shop.tenant_id for load in second.opened} & tenants

        # The restored system goes on: a claim joins the live that was open at the target
        # time, and a client opted out then can opt back in.
        load = first.opened[0]
        live = await harness.current_session(load.shop)
        assert live is not None
        claim = await harness.send(
            load.shop, next(c for c in load.clients if c not in load.stoppers), "A12"
        )
        returning = sorted(load.stoppers)[0]
        await harness.send(load.shop, returning, "START")
        conn = await asyncpg.connect(stack.admin_dsn)
        try:
            session_of_claim = await eventually(
                lambda: conn.fetchval(
                    "SELECT live_session_id FROM routing.processed_inbound WHERE message_sid = $1",
                    claim,
                )
            )
        finally:
            await conn.close()
        assert session_of_claim == live.session_id

        async def opted_back_in() -> bool:
            return returning not in await harness.opted_out(load.shop)

        await eventually(opted_back_in)
    finally:
        await harness.close()
        await nats.close()


@contextlib.contextmanager
def _timed(phases: dict[str, float], phase: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    phases[phase] = time.monotonic() - started


def _assert_same(restored: DatabaseState, expected: DatabaseState) -> None:
    assert restored.keys() == expected.keys()
    for table, rows in expected.items():
        missing = sorted(set(rows) - set(restored[table]))
        extra = sorted(set(restored[table]) - set(rows))
        example = [row[:160] for row in (missing or extra)[:1]]
        assert restored[table] == rows, (
            f"{table}: {len(missing)} rows missing, {len(extra)} after the target, e.g. {example}"
        )


async def _timeline(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT timeline_id FROM pg_control_checkpoint()"))
    finally:
        await conn.close()


def _report(
    size: DrillSize,
    first: Wave,
    second: Wave,
    written: Mapping[str, int],
    target_time: str,
    phases: Mapping[str, float],
    counts: Mapping[str, Mapping[str, int]],
) -> None:
    lines = [
        f"restore drill: {size.shops} shops per wave, {size.clients} clients per shop",
        f"  first wave: {len(first.webhooks)} webhooks, {len(first.enqueued)} messages enqueued;"
        " transactions written " + ", ".join(f"{when}: {n}" for when, n in written.items()),
        f"  second wave: {len(second.webhooks)} webhooks, {len(second.enqueued)} messages enqueued",
        f"  recovery target {target_time}",
        "  seconds: " + ", ".join(f"{phase} {took:.1f}" for phase, took in phases.items()),
        f"  {'rows':<34}" + "".join(f"{column:>11}" for column in counts),
    ]
    tables = sorted(table for table, rows in counts["at end"].items() if rows)
    lines += [
        f"  {table:<34}" + "".join(f"{column[table]:>11}" for column in counts.values())
        for table in tables
    ]
    print("\n".join(lines))
