"""Session-wide real infrastructure: an embedded PostgreSQL 18 and NATS JetStream, started
once for the run (or taken from DATABASE_URL / NATS_URL) and stopped by PID at the end."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.auth import issue_token
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
def jwt_secret() -> Iterator[str]:
    secret = os.environ.get("SNAPSELL_JWT_SECRET") or secrets.token_urlsafe(32)
    previous = os.environ.get("SNAPSELL_JWT_SECRET")
    os.environ["SNAPSELL_JWT_SECRET"] = secret
    yield secret
    if previous is None:
        os.environ.pop("SNAPSELL_JWT_SECRET", None)


@pytest.fixture
def make_token(jwt_secret: str) -> Callable[..., str]:
    def make(role: str, tenant_id: str | None = None, sub: str = "test") -> str:
        return issue_token(jwt_secret, sub=sub, role=role, tenant_id=tenant_id)

    return make
