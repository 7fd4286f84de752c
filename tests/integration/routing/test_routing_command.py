"""The process contract: `python -m services.routing migrate` provisions and migrates (again and
again), and a bad configuration stops the process at once with one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg

from tools.stack import reset_service_schema

ROOT = Path(__file__).resolve().parents[3]


def run_routing(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.routing", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_migrate_provisions_the_schema_and_is_idempotent(admin_dsn: str) -> None:
    await reset_service_schema(admin_dsn, "routing")
    for _ in range(2):
        done = run_routing("migrate", env={"DATABASE_URL": admin_dsn})
        assert done.returncode == 0, done.stdout + done.stderr
    conn = await asyncpg.connect(admin_dsn)
    try:
        tables = {
            row["tablename"]
            for row in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'routing'"
            )
        }
    finally:
        await conn.close()
    assert {"processed_inbound", "opt_outs", "consent_log", "last_inbound", "failed_inbound"} <= (
        tables
    )


def test_a_bad_configuration_exits_2_with_one_line(admin_dsn: str, nats_url: str) -> None:
    done = run_routing(env={"ROUTING_TENANT_RULES": "{not json", "NATS_URL": nats_url})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "ROUTING_TENANT_RULES" in done.stderr


def test_an_unknown_subcommand_is_refused() -> None:
    done = run_routing("serve-twice", env={})
    assert done.returncode == 2 and "usage" in done.stderr
