"""seller_admin's database role cannot read or write another service's schema (nor the reverse)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from infra.db import provision_service, service_dsn
from tools.stack import reset_service_schema

# A schema of its own, provisioned exactly like a real service's (e.g. routing's), so this test
# never disturbs the schema another suite of the same run is using.
OTHER = "routing_isolation_probe"


@pytest.fixture(scope="module")
async def other_service(admin_dsn: str) -> AsyncIterator[str]:
    await reset_service_schema(admin_dsn, OTHER)
    await provision_service(admin_dsn, OTHER)
    dsn = service_dsn(admin_dsn, OTHER)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": OTHER})
    try:
        await conn.execute("CREATE TABLE opt_outs (address text PRIMARY KEY)")
        await conn.execute("INSERT INTO opt_outs VALUES ('+33612345678')")
    finally:
        await conn.close()
    yield dsn
    await reset_service_schema(admin_dsn, OTHER)
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP ROLE IF EXISTS "snapsell_{OTHER}"')
    finally:
        await admin.close()


@pytest.mark.parametrize(
    "statement",
    [
        f"SELECT * FROM {OTHER}.opt_outs",
        f"INSERT INTO {OTHER}.opt_outs VALUES ('+33600000000')",
        f"DELETE FROM {OTHER}.opt_outs",
        f"CREATE TABLE {OTHER}.planted (x int)",
        f"DROP TABLE {OTHER}.opt_outs",
    ],
)
async def test_seller_admin_role_cannot_touch_another_schema(
    statement: str, pool: asyncpg.Pool, other_service: str
) -> None:
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_user") == "snapsell_seller_admin"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)


async def test_another_role_cannot_read_seller_admin(
    pool: asyncpg.Pool, other_service: str
) -> None:
    conn = await asyncpg.connect(other_service)
    try:
        for table in ("tenants", "channels", "seller_phones", "events"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(f"SELECT * FROM seller_admin.{table}")
    finally:
        await conn.close()


async def test_seller_admin_role_cannot_grant_itself_more(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        assert not await conn.fetchval(
            "SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles"
            " WHERE rolname = current_user"
        )
