"""The restore drill's own world: a PostgreSQL that archives its WAL (with its default
durability, as in production), a NATS JetStream, and the whole system on top, all under a
temporary directory the server's user can traverse (tools/devstack.py runs PostgreSQL as
`nobody` when root). Everything is stopped by PID and removed at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from infra import jetstream
from tests.drills.pitr import BackupSite
from tests.drills.waves import Traffic
from tests.e2e.conftest import FAST_ENV
from tests.e2e.harness import Harness
from tests.support.stack import SystemStack, start_system
from tools.dev_keys import DevKeys
from tools.devstack import EmbeddedNats, EmbeddedPostgres

# The end-to-end tests' quick polls and retries, so each wave settles within seconds; not their
# one-minute inactivity window: the lives must stay open from one wave to the next.
DRILL_ENV = {service: env for service, env in FAST_ENV.items() if service != "live_session"}


@pytest.fixture(scope="package")
def drill_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="snapsell-restore-drill-"))
    root.chmod(0o711)  # traversable, not listable, by the server's user
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="package")
def backup_site(drill_dir: Path) -> BackupSite:
    return BackupSite.create(drill_dir)


@pytest.fixture(scope="package")
def source_postgres(drill_dir: Path, backup_site: BackupSite) -> Iterator[EmbeddedPostgres]:
    postgres = EmbeddedPostgres(drill_dir / "source", settings=backup_site.archiving_settings())
    postgres.start()
    try:
        yield postgres
    finally:
        postgres.destroy()


@pytest.fixture(scope="package")
def drill_nats(drill_dir: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(drill_dir / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
async def source_system(
    source_postgres: EmbeddedPostgres,
    drill_nats: EmbeddedNats,
    token_keys: DevKeys,
    drill_dir: Path,
) -> AsyncIterator[SystemStack]:
    stack = await start_system(
        source_postgres.dsn,
        drill_nats.url,
        token_keys,
        drill_dir / "source-system",
        service_env=DRILL_ENV,
        trace=False,
    )
    try:
        yield stack
    finally:
        await stack.stop()


@pytest.fixture(scope="package")
async def traffic(source_system: SystemStack) -> AsyncIterator[Traffic]:
    nats = await jetstream.connect(source_system.nats_url, name="restore-drill")
    harness = Harness(source_system, nats)
    traffic = Traffic(harness)
    try:
        yield traffic
    finally:
        await traffic.close()
        await harness.close()
        await nats.close()
