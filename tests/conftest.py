"""Session-wide real infrastructure: an embedded PostgreSQL 18 and NATS JetStream, started
once for the run (or taken from DATABASE_URL / NATS_URL) and stopped by PID at the end."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tools.dev_keys import IDENTITIES, DevKeys
from tools.devstack import EmbeddedNats, EmbeddedPostgres


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (a timeout, a CI cancel) ends the run like Ctrl-C does, so fixtures still stop
    # the servers they started instead of leaving them orphaned.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def admin_dsn(state_dir: Path) -> Iterator[str]:
    given = os.environ.get("DATABASE_URL")
    if given:
        yield given
        return
    postgres = EmbeddedPostgres(state_dir / "postgres", fast=True)
    dsn = postgres.start()
    os.environ["DATABASE_URL"] = dsn
    try:
        yield dsn
    finally:
        os.environ.pop("DATABASE_URL", None)
        postgres.destroy()


@pytest.fixture(scope="session")
def nats_url(state_dir: Path) -> Iterator[str]:
    given = os.environ.get("NATS_URL")
    if given:
        yield given
        return
    server = EmbeddedNats(state_dir / "nats")
    url = server.start()
    os.environ["NATS_URL"] = url
    try:
        yield url
    finally:
        os.environ.pop("NATS_URL", None)
        server.stop()


@pytest.fixture(scope="session")
def token_keys(state_dir: Path) -> Iterator[DevKeys]:
    """This session's signing keys: one per service identity, the operator's, and a `test`
    service that no access policy names (`make_token("service")`: a service allowed nothing).
    In-process verifiers find the trusted key set through the environment, as services do."""
    keys = DevKeys(state_dir / "keys", (*IDENTITIES, "test"))
    previous = os.environ.get("SNAPSELL_TRUSTED_KEYS_FILE")
    os.environ["SNAPSELL_TRUSTED_KEYS_FILE"] = str(keys.trusted_keys_file)
    yield keys
    if previous is None:
        os.environ.pop("SNAPSELL_TRUSTED_KEYS_FILE", None)


@pytest.fixture
def make_token(token_keys: DevKeys) -> Callable[..., str]:
    """`make_token(role, tenant_id=None, sub="test", audience=None)`: a `service` token is signed
    by the key of the service `sub` names; other roles by the operator key. Without `audience`
    the token is good for every service."""
    return token_keys.token
