"""Shared checks of the data-hygiene tests: query plans read from EXPLAIN (FORMAT JSON), the
event subjects a service's code records, and the `events_subject_known` constraint."""

from __future__ import annotations

import ast
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg

from tests.support.polling import eventually
from tests.support.processes import assert_stopped_cleanly, start_service
from tools.stack import reset_service_schema

ROOT = Path(__file__).resolve().parents[2]
Plan = dict[str, Any]


async def explain(conn: asyncpg.Connection | asyncpg.Pool, sql: str, *params: object) -> Plan:
    """The plan PostgreSQL chooses for `sql` with these parameter values (not executed)."""
    raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *params)
    return json.loads(raw)[0]["Plan"]


def plan_nodes(plan: Plan) -> Iterator[Plan]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


def indexes_used(plan: Plan) -> set[str]:
    """Indexes the plan reads (scans, bitmap scans) or checks (ON CONFLICT arbiters)."""
    used: set[str] = set()
    for node in plan_nodes(plan):
        if "Index Name" in node:
            used.add(node["Index Name"])
        used.update(node.get("Conflict Arbiter Indexes", ()))
    return used


def assert_uses_index(plan: Plan, index: str, *, big_tables: tuple[str, ...]) -> None:
    """`index` is used and none of `big_tables` is read sequentially."""
    seq_scans = [
        node["Relation Name"]
        for node in plan_nodes(plan)
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in big_tables
    ]
    assert not seq_scans, f"sequential scan of {seq_scans}:\n{json.dumps(plan, indent=1)}"
    assert index in indexes_used(plan), f"{index} unused:\n{json.dumps(plan, indent=1)}"


def recorded_subjects(service: str) -> set[str]:
    """Every string literal in the service's code shaped like one of its own event subjects
    (`<service>.v<N>.<entity>.<past_tense>`): what it can record. Subjects of other contexts
    (streams it consumes) are not its events."""
    shape = re.compile(rf"^{re.escape(service)}\.v[0-9]+\.[a-z_]+\.[a-z_]+$")
    found: set[str] = set()
    for path in sorted((ROOT / "services" / service).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if shape.match(node.value):
                    found.add(node.value)
    return found


async def known_subjects(conn: asyncpg.Connection | asyncpg.Pool) -> set[str]:
    """The subjects listed in the current schema's `events_subject_known` constraint."""
    definition = await conn.fetchval(
        """
        SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
        WHERE c.conname = 'events_subject_known'
          AND c.conrelid = to_regclass(current_schema() || '.events')
        """
    )
    assert definition is not None, "events has no events_subject_known constraint"
    return set(re.findall(r"'([^']+)'", definition))


async def insert_event(conn: asyncpg.Connection | asyncpg.Pool, subject: str) -> None:
    await conn.execute(
        "INSERT INTO events (subject, aggregate_id, payload) VALUES ($1, 'test', '')", subject
    )


async def assert_subject_accepted(pool: asyncpg.Pool, subject: str) -> None:
    """The events table takes this subject (the insert is rolled back)."""
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await insert_event(conn, subject)
        finally:
            await transaction.rollback()


@contextlib.asynccontextmanager
async def process_with_fast_retention(
    admin_dsn: str, nats_url: str, service: str, env: dict[str, str] | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """The real `python -m services.<service>` on a fresh schema, purging every second events
    published more than 2 days ago; yields an admin connection to its schema."""
    await reset_service_schema(admin_dsn, service)
    running = await start_service(
        service,
        {
            "DATABASE_URL": admin_dsn,
            "NATS_URL": nats_url,
            "EVENTS_RETENTION_DAYS": "2",
            "RETENTION_INTERVAL_SECONDS": "1",
            **(env or {}),
        },
    )
    conn = await asyncpg.connect(admin_dsn, server_settings={"search_path": service})
    try:
        yield conn
    finally:
        await conn.close()
        assert_stopped_cleanly(running)


async def wait_until_zero(conn: asyncpg.Connection, count_sql: str, timeout_s: float = 15) -> None:
    async def zero() -> bool:
        return not await conn.fetchval(count_sql)

    await eventually(zero, count_sql, timeout_s=timeout_s, every_s=0.2)


async def assert_process_purges_old_events(
    admin_dsn: str, nats_url: str, service: str, subject: str
) -> None:
    """The process runs the retention task: a published event 3 days old goes within a
    RETENTION_INTERVAL_SECONDS or two, one a day old stays."""
    async with process_with_fast_retention(admin_dsn, nats_url, service) as conn:
        await conn.execute(
            "INSERT INTO events (subject, aggregate_id, payload, published_at)"
            " SELECT $1, age || ' days', '', now() - make_interval(days => age)"
            " FROM (VALUES (3), (1)) AS a(age)",
            subject,
        )
        await wait_until_zero(conn, "SELECT count(*) FROM events WHERE aggregate_id = '3 days'")
        assert await conn.fetchval("SELECT count(*) FROM events WHERE aggregate_id = '1 days'")
