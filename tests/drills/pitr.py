"""Point-in-time recovery of the embedded PostgreSQL, done as an operator would: continuous WAL
archiving (`archive_command`), a base backup taken while the services write (`pg_basebackup`
without WAL, so a restore needs the archive), then a new data directory made from the backup
that replays the archive up to a target time (`recovery.signal`, `restore_command`,
`recovery_target_time`) and is promoted.

As root the server runs as `nobody` (tools/devstack.py): the archive, the backup and the
restored cluster belong to that user and lie under a directory it can traverse.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tests.e2e.harness import eventually
from tools.devstack import (
    EmbeddedPostgres,
    as_postgres_user,
    postgres_program,
    postgres_user_dir,
)

ARCHIVE_TIMEOUT_S = 60.0
# With hot standby off a recovering server accepts no connection: a restored one is ready once
# its recovery is over and it is promoted.
_RECOVERY_SETTINGS = {"hot_standby": "off", "recovery_target_action": "promote"}
_TABLES = """
SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables
WHERE table_schema = ANY($1::text[]) AND table_type = 'BASE TABLE'
ORDER BY 1
"""

# The id the next writing transaction will get (ids go to writing transactions only): the
# difference of two readings counts the transactions that wrote in between.
NEXT_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text"

DatabaseState = dict[str, list[str]]  # "schema.table" -> its rows as text, sorted


@dataclass(frozen=True)
class BackupSite:
    """Where the WAL archive and the base backup are kept (both owned by the server's user)."""

    wal: Path
    base: Path

    @classmethod
    def create(cls, root: Path) -> BackupSite:
        return cls(
            wal=postgres_user_dir(root / "wal-archive"),
            base=postgres_user_dir(root / "base-backup"),
        )

    def archiving_settings(self) -> dict[str, str]:
        """For the cluster to back up: every finished WAL segment copied into the archive once."""
        wal = shlex.quote(str(self.wal))
        return {"archive_mode": "on", "archive_command": f"test ! -f {wal}/%f && cp %p {wal}/%f"}

    def recovery_settings(self, target_time: str) -> dict[str, str]:
        """For the restored cluster: replay the archive up to `target_time`, then promote."""
        restore = f"cp {shlex.quote(str(self.wal))}/%f %p"
        return {
            **_RECOVERY_SETTINGS,
            "restore_command": restore,
            "recovery_target_time": target_time,
        }

    def take_base_backup(self, postgres: EmbeddedPostgres) -> None:
        """`pg_basebackup` of the running cluster, without WAL (blocking: run it in a thread).
        Not synced to disk: the drill's host does not crash in between."""
        _run(
            postgres_program("pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres"),
            *("-D", str(self.base), "--wal-method=none", "--checkpoint=fast", "--no-sync"),
        )

    def restore_into(self, restored: EmbeddedPostgres) -> None:
        """A new data directory from the base backup, marked to recover from the archive; the
        target is in `restored`'s settings (`recovery_settings`). Start it afterwards."""
        data_dir = postgres_user_dir(restored.data_dir)
        if any(data_dir.iterdir()):
            raise FileExistsError(f"{data_dir} is not empty")
        _run("cp", "-a", f"{self.base}/.", str(data_dir))
        _run("touch", str(data_dir / "recovery.signal"))


@contextlib.contextmanager
def restored_cluster(
    site: BackupSite, state_dir: Path, target_time: str
) -> Iterator[EmbeddedPostgres]:
    """A new cluster in `state_dir`, restored from `site` to `target_time` and promoted, running;
    stopped and removed on exit."""
    restored = EmbeddedPostgres(state_dir, settings=site.recovery_settings(target_time))
    try:
        site.restore_into(restored)
        restored.start()
        yield restored
    finally:
        restored.destroy()


def _run(*cmd: str) -> None:
    done = subprocess.run(
        as_postgres_user(*cmd), capture_output=True, text=True, check=False, cwd="/"
    )
    if done.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({done.returncode}): {done.stderr.strip()}")


async def archive_current_wal(dsn: str) -> str:
    """Close the current WAL segment and wait until the archiver has copied it: everything
    committed so far is then in the archive. Returns the segment's name."""
    conn = await asyncpg.connect(dsn)
    try:
        segment = str(await conn.fetchval("SELECT pg_walfile_name(pg_switch_wal())"))

        async def archived() -> bool:
            last = await conn.fetchval("SELECT last_archived_wal FROM pg_stat_archiver")
            return last is not None and str(last) >= segment

        await eventually(archived, timeout_s=ARCHIVE_TIMEOUT_S)
    finally:
        await conn.close()
    return segment


async def read_state(conn: asyncpg.Connection, schemas: Sequence[str]) -> DatabaseState:
    """Every row of every table of `schemas`, as text, sorted: what a restore must bring back."""
    tables = [str(name) for name in await conn.fetchval(f"SELECT array({_TABLES})", schemas)]
    return {
        table: [
            str(row)
            for row in await conn.fetchval(
                f"SELECT array(SELECT t::text FROM {table} t ORDER BY 1)"
            )
        ]
        for table in tables
    }


async def state_at_now(dsn: str, schemas: Sequence[str]) -> tuple[str, DatabaseState]:
    """The database's clock and, in the same snapshot, its state: a recovery target and what a
    restore to it must show. Meant for a quiet moment (no commit in flight), which makes the
    two agree exactly."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            # The snapshot is taken by this first statement, before the clock is read: a
            # transaction it shows committed before the target time.
            now = str(await conn.fetchval("SELECT clock_timestamp()::text"))
            return now, await read_state(conn, schemas)
    finally:
        await conn.close()


async def next_transaction_id(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(NEXT_XID))
    finally:
        await conn.close()


async def state(dsn: str, schemas: Sequence[str]) -> DatabaseState:
    conn = await asyncpg.connect(dsn)
    try:
        return await read_state(conn, schemas)
    finally:
        await conn.close()


def row_counts(found: Mapping[str, list[str]]) -> dict[str, int]:
    return {table: len(rows) for table, rows in found.items()}
