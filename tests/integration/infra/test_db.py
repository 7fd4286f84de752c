"""The per-service role and schema, and the migration runner, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from infra.db import apply_migrations, create_pool, provision_service, service_dsn
from tools.stack import reset_service_schema


@pytest.fixture
async def two_services(admin_dsn: str) -> list[str]:
    names = ["dbtest_a", "dbtest_b"]
    for name in names:
        await reset_service_schema(admin_dsn, name)
    return names


def write_migrations(directory: Path, *sqls: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, sql in enumerate(sqls, start=1):
        (directory / f"{index:03d}_step.sql").write_text(sql)
    return directory


async def test_service_role_cannot_touch_another_services_schema(
    admin_dsn: str, two_services: list[str], tmp_path: Path
) -> None:
    a, b = two_services
    for name in (a, b):
        await provision_service(admin_dsn, name)
        migrations = write_migrations(tmp_path / name, "CREATE TABLE things (id int PRIMARY KEY);")
        await apply_migrations(service_dsn(admin_dsn, name), name, migrations)

    pool = await create_pool(service_dsn(admin_dsn, a), a)
    try:
        async with pool.acquire() as conn:
            await conn.execute("INSERT INTO things VALUES (1)")  # its own schema works
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(f'SELECT * FROM "{b}".things')
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f'INSERT INTO "{b}".things VALUES (2)')
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f'CREATE TABLE "{b}".intruder (id int)')
    finally:
        await pool.close()


async def test_migrations_apply_once_in_order_even_when_replicas_race(
    admin_dsn: str, two_services: list[str], tmp_path: Path
) -> None:
    name = two_services[0]
    await provision_service(admin_dsn, name)
    migrations = write_migrations(
        tmp_path / "m",
        "CREATE TABLE log (step int NOT NULL);",
        "INSERT INTO log VALUES (2);",
        "INSERT INTO log VALUES (3);",
    )
    dsn = service_dsn(admin_dsn, name)
    results = await asyncio.gather(*(apply_migrations(dsn, name, migrations) for _ in range(4)))

    applied = [names for names in results if names]
    assert len(applied) == 1
    assert applied[0] == [
        "infra/001_events.sql",
        "infra/002_events_published_at.sql",
        "infra/003_audit_events.sql",
        f"{name}/001_step.sql",
        f"{name}/002_step.sql",
        f"{name}/003_step.sql",
    ]
    conn = await asyncpg.connect(dsn, server_settings={"search_path": name})
    try:
        assert [r["step"] for r in await conn.fetch("SELECT step FROM log ORDER BY step")] == [2, 3]
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_half_applied(
    admin_dsn: str, two_services: list[str], tmp_path: Path
) -> None:
    name = two_services[0]
    await provision_service(admin_dsn, name)
    migrations = write_migrations(
        tmp_path / "bad", "CREATE TABLE ok (id int);", "CREATE TABLE half (id int); SELECT 1/0;"
    )
    dsn = service_dsn(admin_dsn, name)
    with pytest.raises(asyncpg.DivisionByZeroError):
        await apply_migrations(dsn, name, migrations)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": name})
    try:
        assert await conn.fetchval("SELECT to_regclass('half')") is None
        assert await conn.fetchval("SELECT to_regclass('ok')") is not None
        names = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")]
        assert f"{name}/002_step.sql" not in names
    finally:
        await conn.close()


async def test_provisioning_is_idempotent_under_concurrency(
    admin_dsn: str, two_services: list[str]
) -> None:
    name = two_services[1]
    await asyncio.gather(*(provision_service(admin_dsn, name) for _ in range(5)))
    conn = await asyncpg.connect(admin_dsn)
    try:
        owner = await conn.fetchval(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1", name
        )
        assert owner == f"snapsell_{name}"
    finally:
        await conn.close()
