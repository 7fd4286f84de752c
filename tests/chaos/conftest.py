"""The fault suite's own world. It kills PostgreSQL and NATS, so it starts its own embedded ones
(the session's, from tests/conftest.py, are shared by every other test), on free ports, with
their state in this package's temporary directory; then the whole system as processes on top,
a second outbox process (so a killed worker's leases are taken over while it restarts), and a
cuttable relay between NATS and each of routing and the gateway. Everything is stopped by PID.

PostgreSQL runs with its default durability here, not the session's fast settings: with
`synchronous_commit=off` an immediate stop may lose commits already acknowledged, which is
what the suite checks never happens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.chaos.faults import FAST_RECOVERY_ENV, ChaosWorld
from tests.chaos.nats_link import NatsLink
from tests.support.processes import spawn_service
from tests.support.stack import start_system
from tools.dev_keys import DevKeys
from tools.devstack import EmbeddedNats, EmbeddedPostgres, nats_service_env

_PORT_VARIABLES = ("GRPC_PORT", "HTTP_PORT", "METRICS_PORT")


@pytest.fixture(scope="package")
def chaos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos")


@pytest.fixture(scope="package")
def chaos_postgres(chaos_dir: Path) -> Iterator[EmbeddedPostgres]:
    postgres = EmbeddedPostgres(chaos_dir / "postgres")
    postgres.start()
    try:
        yield postgres
    finally:
        postgres.destroy()


@pytest.fixture(scope="package")
def chaos_nats(chaos_dir: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(chaos_dir / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
async def nats_links(chaos_nats: EmbeddedNats) -> AsyncIterator[dict[str, NatsLink]]:
    links = {service: NatsLink(chaos_nats.port) for service in ("routing", "gateway")}
    try:
        for link in links.values():
            await link.start()
        yield links
    finally:
        for link in links.values():
            await link.close()


@pytest.fixture(scope="package")
async def chaos_world(
    chaos_postgres: EmbeddedPostgres,
    chaos_nats: EmbeddedNats,
    nats_links: dict[str, NatsLink],
    token_keys: DevKeys,
    chaos_dir: Path,
) -> AsyncIterator[ChaosWorld]:
    service_env = {name: dict(env) for name, env in FAST_RECOVERY_ENV.items()}
    for service, link in nats_links.items():
        # Through the link, as the service's own NATS user.
        service_env[service] |= nats_service_env(chaos_nats.url, service) | {"NATS_URL": link.url}
    stack = await start_system(
        chaos_postgres.dsn,
        chaos_nats.url,
        token_keys,
        chaos_dir / "system",
        service_env=service_env,
        trace=False,
    )
    world = None
    try:
        outbox = stack.services["outbox"]
        env = {key: value for key, value in outbox.env.items() if key not in _PORT_VARIABLES}
        spare = spawn_service("outbox", env, log_dir=outbox.log_path.parent)
        world = ChaosWorld(stack, chaos_postgres, chaos_nats, nats_links, spare)
        await spare.wait_ready(timeout_s=60)
        yield world
    finally:
        if world is not None:
            world.spare_outbox.stop()  # the one running now: a fault may have replaced it
        await stack.stop()
