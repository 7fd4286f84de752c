"""PostgreSQL for a service: its own role and schema, ordered migrations, and a pool.

Each service owns one schema named after it and one role `snapsell_<service>` that owns that
schema and nothing else, so a service cannot read another's tables. `DATABASE_URL` is an admin
DSN used only to create the role and schema; the service then connects as its own role, with
`SERVICE_DATABASE_URL` when given (production: a managed role with a password) or, by default,
the admin DSN with the user swapped (local clusters that trust loopback connections).

The admin need not be a superuser: in Kubernetes the migrations Job connects as
`snapsell_migrator`, a plain role that is a member of every service role (declared beforehand
as CloudNativePG managed roles) and of the database owner. With an admin DSN the migrations
run over the admin's connection after `SET ROLE snapsell_<service>`, so the objects belong to
the service's role and the migrations need no service password.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeAlias
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import asyncpg.pool

from infra.config import ConfigError, env_optional

# A connection as the stores take it: `pool.acquire()` yields a proxy of one, not the class.
Connection: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

INFRA_MIGRATIONS = Path(__file__).parent / "migrations"
_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
_MIGRATION_LOCK = "hashtext('snapsell.migrate.' || $1)"
_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


# The database is away for now (restarting, failing over, the connection cut by the server or
# the network, full of connections): the same statement will work later, so callers retry
# rather than treat it as a bug. asyncpg raises InternalClientError when the server ends a
# connection in the middle of an operation (e.g. `pg_terminate_backend` during a BEGIN).
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # shutting down, starting up, terminated by an admin
    asyncpg.InsufficientResourcesError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def service_role(service: str) -> str:
    if not _IDENTIFIER.match(service):
        raise ValueError(f"invalid service name {service!r}")
    return f"snapsell_{service}"


def service_dsn(admin_dsn: str, service: str) -> str:
    """The admin DSN with the user replaced by the service's role and no password."""
    parts = urlsplit(admin_dsn)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(service_role(service))}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def provision_service(admin_dsn: str, service: str, password: str | None = None) -> None:
    """Create the service's login role and schema if missing; idempotent and safe to race."""
    role = service_role(service)
    conn = await asyncpg.connect(admin_dsn)
    try:
        async with conn.transaction():
            # CREATE ROLE has no IF NOT EXISTS; serialise concurrent provisioners instead.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('snapsell.provision'))")
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await conn.execute(f'CREATE ROLE "{role}" LOGIN')
                if password:
                    await conn.execute(f'ALTER ROLE "{role}" PASSWORD {quote_literal(password)}')
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{service}" AUTHORIZATION "{role}"')
            await conn.execute(f'REVOKE ALL ON SCHEMA "{service}" FROM PUBLIC')
    finally:
        await conn.close()


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def migration_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.glob("*.sql"))
    for path in files:
        if not _MIGRATION_NAME.match(path.name):
            raise ValueError(f"migration {path} is not named NNN_name.sql")
    return files


async def apply_migrations(
    dsn: str, service: str, migrations_dir: Path, *, role: str | None = None
) -> list[str]:
    """Apply infra's and the service's migrations not yet applied, in order, each in its own
    transaction, under an advisory lock so concurrent replicas apply each exactly once; as
    ROLE when given (the connecting user must be a member of it). Returns the names applied
    by this call."""
    pending = [("infra", p) for p in migration_files(INFRA_MIGRATIONS)]
    pending += [(service, p) for p in migration_files(migrations_dir)]
    conn = await asyncpg.connect(dsn, server_settings={"search_path": service})
    applied: list[str] = []
    try:
        if role is not None:
            await conn.execute(f'SET ROLE "{role}"')
        await conn.execute(f"SELECT pg_advisory_lock({_MIGRATION_LOCK})", service)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text CONSTRAINT schema_migrations_pkey PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for owner, path in pending:
                name = f"{owner}/{path.name}"
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied.append(name)
        finally:
            await conn.execute(f"SELECT pg_advisory_unlock({_MIGRATION_LOCK})", service)
    finally:
        await conn.close()
    return applied


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Services set no session state beyond the pool's server settings, so returning a
    connection needs no RESET ALL / UNLISTEN round trip; asyncpg still rolls back a transaction
    left open. Code that LISTENs on a pooled connection must UNLISTEN before releasing it."""


async def create_pool(
    dsn: str, service: str, *, min_size: int = 2, max_size: int = 10
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"search_path": service, "application_name": f"snapsell-{service}"},
        reset=_keep_session,
    )
    assert pool is not None
    return pool


def resolve_dsns(service: str) -> tuple[str | None, str]:
    """(admin DSN or None, the service's own DSN) from the environment."""
    admin = env_optional("DATABASE_URL")
    own = env_optional("SERVICE_DATABASE_URL")
    if own is None and admin is None:
        raise ConfigError("DATABASE_URL or SERVICE_DATABASE_URL is required")
    for name, value in (("DATABASE_URL", admin), ("SERVICE_DATABASE_URL", own)):
        if value is not None and urlsplit(value).scheme not in ("postgres", "postgresql"):
            raise ConfigError(f"{name} must be a postgresql:// URL")
    return admin, own or service_dsn(admin or "", service)


async def migrate_service(service: str, migrations_dir: Path) -> str:
    """Provision (when an admin DSN is configured) and migrate; returns the service DSN."""
    admin, own = resolve_dsns(service)
    if admin is None:
        await apply_migrations(own, service, migrations_dir)
        return own
    await provision_service(admin, service, urlsplit(own).password)
    await apply_migrations(admin, service, migrations_dir, role=service_role(service))
    return own


async def open_service_database(
    service: str, migrations_dir: Path, *, min_size: int = 2, max_size: int = 10
) -> asyncpg.Pool:
    dsn = await migrate_service(service, migrations_dir)
    return await create_pool(dsn, service, min_size=min_size, max_size=max_size)
