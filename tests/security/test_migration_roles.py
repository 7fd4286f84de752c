"""The migrations Job connects as a migrator role that is no superuser and holds no service's
password: it must still provision each service's schema and apply its migrations, and what it
creates must belong to the service's role, never to the migrator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from infra.db import migrate_service, service_role

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
    """A migrator shaped like the production one: CREATEROLE, not a superuser, a member of the
    service's role (created beforehand, as CloudNativePG's managed roles are), allowed to create
    schemas. The service's role cannot log in, so nothing can sneak through as it."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await drop_roles(conn)
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'CREATE ROLE "{service_role(SERVICE)}" NOLOGIN')
        await conn.execute(f'CREATE ROLE "{MIGRATOR}" LOGIN CREATEROLE NOSUPERUSER')
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
