"""The image `make images` builds runs what the manifests say: as their user, with nothing
writable but what they mount (/tmp), every command they name present, the migrations Job's
commands applying the migrations, and every service started with its Deployment's command
answering health checks, against the session's PostgreSQL and NATS, until a signed webhook
comes out at the sandbox."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra import jetstream
from infra.db import INFRA_MIGRATIONS, migration_files
from tests.e2e.harness import Harness, new_mobile, shop_from_api
from tests.image.containers import ImageRunner
from tests.image.manifests import app_containers, argv, migration_commands, service_commands
from tests.support.polling import eventually
from tools.deploy import images
from tools.deploy.render import Manifest
from tools.dev_keys import DevKeys
from tools.stack import DB_SERVICES, ROOT, SERVICES, SystemStack, reset_service_schema, start_system

# Run in the image: who it runs as, what its user can write outside the mounted paths (argv
# 2), which build tools and build inputs it holds, and whether each command (argv 1) that a
# manifest names exists there.
INSPECT = r"""
import importlib.util, json, os, shutil, sys
skipped = {"/proc", "/sys", "/dev", *json.loads(sys.argv[2])}
writable = []
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in skipped]
    for path in (os.path.join(root, name) for name in dirs + files):
        if not os.path.islink(path) and os.access(path, os.W_OK):
            writable.append([path, os.stat(path).st_mode & 0o7777])
def present(argv):
    if shutil.which(argv[0]) is None:
        return False
    return argv[1:2] != ["-m"] or importlib.util.find_spec(argv[2]) is not None
print(json.dumps({
    "user": f"{os.getuid()}:{os.getgid()}",
    "writable": writable,
    "build_tools": [t for t in ("cc", "gcc", "c++", "make", "ld", "as", "pip") if shutil.which(t)],
    # The wheels, the sources and any package-index settings stay in the build stage or host.
    "build_inputs": [p for p in ("/wheels", "/src", "/etc/pip.conf", "/etc/xdg/pip")
                     if os.path.exists(p)],
    "present": [present(argv) for argv in json.loads(sys.argv[1])],
}))
"""
# The world-writable, sticky temp directories of a Debian root (/var/tmp, /run/lock): a
# read-only root filesystem makes them read-only, and so does the smoke run below.
SHARED_TEMP_MODE = 0o1777


@pytest.fixture(scope="package")
def inspected(runner: ImageRunner, manifests: list[Manifest]) -> dict[str, Any]:
    commands = [argv(container) for _, _, container in app_containers(manifests)]
    # As the image's own USER (not the manifests'): the image must default to it.
    mounted = json.dumps(list(runner.writable))
    done = runner.run(["python", "-c", INSPECT, json.dumps(commands), mounted], user=False)
    assert done.returncode == 0, done.stderr
    return {"commands": commands, **json.loads(done.stdout)}


def test_image_stays_within_its_size_budget(built: images.BuiltImage) -> None:
    assert built.size_bytes <= images.SIZE_BUDGET_BYTES, built.summary()


def test_image_runs_as_the_manifests_user_without_build_tools_or_inputs(
    inspected: dict[str, Any], manifest_user: str
) -> None:
    assert inspected["user"] == manifest_user
    assert inspected["build_tools"] == []
    assert inspected["build_inputs"] == []


def test_nothing_but_temp_directories_is_writable_by_the_user(inspected: dict[str, Any]) -> None:
    assert [path for path, mode in inspected["writable"] if mode != SHARED_TEMP_MODE] == []


def test_every_command_the_manifests_name_exists_in_the_image(inspected: dict[str, Any]) -> None:
    missing = [
        c for c, ok in zip(inspected["commands"], inspected["present"], strict=True) if not ok
    ]
    assert missing == []


async def test_the_migrations_job_commands_apply_every_migration(
    runner: ImageRunner, manifests: list[Manifest], admin_dsn: str
) -> None:
    commands = migration_commands(manifests)
    assert sorted(command[2].removeprefix("services.") for command in commands) == sorted(
        DB_SERVICES
    )
    for service in DB_SERVICES:
        await reset_service_schema(admin_dsn, service)
    for command in commands:
        started = time.monotonic()
        done = runner.run(command, {"DATABASE_URL": admin_dsn})
        print(f"{' '.join(command)}: exit {done.returncode} in {time.monotonic() - started:.1f} s")
        assert done.returncode == 0, done.stdout + done.stderr
    conn = await asyncpg.connect(admin_dsn)
    try:
        for service in DB_SERVICES:
            applied = await conn.fetch(f'SELECT name FROM "{service}".schema_migrations')
            shipped = [
                f"{owner}/{path.name}"
                for owner, directory in (
                    ("infra", INFRA_MIGRATIONS),
                    (service, ROOT / "services" / service / "migrations"),
                )
                for path in migration_files(directory)
            ]
            assert sorted(row["name"] for row in applied) == sorted(shipped)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def stack(
    runner: ImageRunner,
    inspected: dict[str, Any],
    manifests: list[Manifest],
    admin_dsn: str,
    nats_url: str,
    token_keys: DevKeys,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[SystemStack]:
    """Every service from the image, each with its Deployment's command and the environment
    `tools.stack` gives it, as the manifests' user, only what they mount writable."""
    commands = service_commands(manifests)
    assert sorted(commands) == sorted(SERVICES)
    runner.read_only = [path for path, _ in inspected["writable"]]
    work_dir: Path = tmp_path_factory.mktemp("image-stack")
    started = time.monotonic()
    system = await start_system(
        admin_dsn, nats_url, token_keys, work_dir, trace=False, launch=runner.launcher(commands)
    )
    print(f"{', '.join(SERVICES)} ready from the image in {time.monotonic() - started:.1f} s")
    try:
        yield system
    finally:
        await system.stop()


async def test_each_grpc_service_from_the_image_answers_serving(stack: SystemStack) -> None:
    for service in DB_SERVICES:
        async with grpc.aio.insecure_channel(stack.address(service)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{service} {stack.address(service)}: health {status}")
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_gateway_from_the_image_is_ready(stack: SystemStack) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        reply = await client.get(f"{stack.public_base_url}/readyz")
    print(f"gateway {stack.public_base_url}/readyz: {reply.status_code}")
    assert reply.status_code == 200


async def test_a_signed_webhook_travels_through_the_image_to_the_sandbox(
    stack: SystemStack,
) -> None:
    shop = await shop_from_api(stack, "image-shop")
    nats = await jetstream.connect(stack.nats_url, name="image-tests")
    harness = Harness(stack, nats)
    try:
        customer = new_mobile()
        # STOP is answered with a confirmation: gateway -> routing -> outbox -> Twilio.
        await harness.send(shop, customer, "STOP")
        [sent] = await eventually(lambda: harness.sandbox_sent(f"whatsapp:{customer}"))
    finally:
        await harness.close()
        await nats.close()
    print(f"webhook STOP from {shop.tenant_id}: the sandbox received {sent['body']!r}")
    assert sent["from"] == shop.sender


async def test_every_service_from_the_image_stops_cleanly_on_sigterm(stack: SystemStack) -> None:
    running = dict(stack.services)
    await stack.stop()
    codes = {name: service.process.returncode for name, service in running.items()}
    print(f"stopped by SIGTERM to each service's own pid, exit codes {codes}")
    assert codes == dict.fromkeys(SERVICES, 0)
