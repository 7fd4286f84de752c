"""Give a test module a clean schema for one service."""

from __future__ import annotations

import asyncpg

from infra.db import service_role


async def reset_service_schema(admin_dsn: str, service: str) -> None:
    """Drop the service's schema and everything its role owns; the service re-provisions."""
    role = service_role(service)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{service}" CASCADE')
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            await conn.execute(f'DROP OWNED BY "{role}" CASCADE')
    finally:
        await conn.close()
