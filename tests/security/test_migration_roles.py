"""The migrations Job connects as a migrator role that is no superuser and holds no service's
password: it must still provision each service's schema and apply its migrations, and what it
creates must belong to the service's role, never to the migrator."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from infra.db import migrate_service, service_role
from tools.deploy.layout import REPO_ROOT

SERVICE = "migtest"
MIGRATOR = "migtest_migrator"


def as_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"{user}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def drop_roles(conn: asyncpg.Connection) -> None:
    await conn.execute(f'DROP SCHEMA IF EXISTS "{SERVICE}" CASCADE')
    for role in (MIGRATOR, service_role(SERVICE)):
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            await conn.execute(f'DROP OWNED BY "{role}" CASCADE')
            await conn.execute(f'DROP ROLE "{role}"')


@pytest.fixture
async def migrator_dsn(admin_dsn: str) -> AsyncIterator[str]:
    """A migrator shaped like the production one: neither superuser nor CREATEROLE, a member of
    the service's role (created beforehand, as CloudNativePG's managed roles are), allowed to
    create schemas. The service's role cannot log in, so nothing can sneak through as it."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await drop_roles(conn)
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'CREATE ROLE "{service_role(SERVICE)}" NOLOGIN')
        await conn.execute(f'CREATE ROLE "{MIGRATOR}" LOGIN NOSUPERUSER NOCREATEROLE')
        await conn.execute(f'GRANT "{service_role(SERVICE)}" TO "{MIGRATOR}"')
        await conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{MIGRATOR}"')
        yield as_user(admin_dsn, MIGRATOR)
        await conn.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM "{MIGRATOR}"')
        await drop_roles(conn)
    finally:
        await conn.close()


async def test_a_non_superuser_migrator_migrates_a_service_without_its_password(
    admin_dsn: str, migrator_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "001_things.sql").write_text("CREATE TABLE things (id int PRIMARY KEY);")
    monkeypatch.setenv("DATABASE_URL", migrator_dsn)
    monkeypatch.delenv("SERVICE_DATABASE_URL", raising=False)

    await migrate_service(SERVICE, tmp_path)

    conn = await asyncpg.connect(admin_dsn)
    try:
        owners = {
            row["name"]: row["owner"]
            for row in await conn.fetch(
                "SELECT tablename AS name, tableowner AS owner FROM pg_tables"
                " WHERE schemaname = $1",
                SERVICE,
            )
        }
        schema_owner = await conn.fetchval(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1", SERVICE
        )
        applied = await conn.fetchval(
            f'SELECT count(*) FROM "{SERVICE}".schema_migrations WHERE name = $1',
            f"{SERVICE}/001_things.sql",
        )
    finally:
        await conn.close()
    role = service_role(SERVICE)
    assert schema_owner == role
    assert {"things", "schema_migrations"} <= owners.keys()  # with infra's own tables
    assert set(owners.values()) == {role}
    assert applied == 1


SERVICES = ("seller_admin", "routing", "outbox", "live_session")
JOB_MIGRATOR = "migtest_job_migrator"


@pytest.fixture
async def job_migrator_dsn(admin_dsn: str) -> AsyncIterator[str]:
    """The production migrator for the real services: their roles exist beforehand (declared
    as CloudNativePG managed roles there), the migrator is a member of each."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        database = await conn.fetchval("SELECT current_database()")
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", JOB_MIGRATOR):
            await conn.execute(f'DROP OWNED BY "{JOB_MIGRATOR}"')
            await conn.execute(f'DROP ROLE "{JOB_MIGRATOR}"')
        await conn.execute(f'CREATE ROLE "{JOB_MIGRATOR}" LOGIN NOSUPERUSER NOCREATEROLE')
        await conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{JOB_MIGRATOR}"')
        for service in SERVICES:
            role = service_role(service)
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await conn.execute(f'CREATE ROLE "{role}" LOGIN')
            await conn.execute(f'GRANT "{role}" TO "{JOB_MIGRATOR}"')
        yield as_user(admin_dsn, JOB_MIGRATOR)
        await conn.execute(f'DROP OWNED BY "{JOB_MIGRATOR}"')
        await conn.execute(f'DROP ROLE "{JOB_MIGRATOR}"')
    finally:
        await conn.close()


async def test_the_migrations_job_commands_run_with_the_migrators_dsn_alone(
    job_migrator_dsn: str,
) -> None:
    # What each container of the snapsell-migrate Job runs, with only what it is given.
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": job_migrator_dsn}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"services.{service}",
            "migrate",
            env=env,
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for service in SERVICES
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in processes)), 120)
    for service, process, (output, _) in zip(SERVICES, processes, outputs, strict=True):
        assert process.returncode == 0, f"{service}: {output.decode()[-2000:]}"
        assert f"{service}.migrated" in output.decode()
