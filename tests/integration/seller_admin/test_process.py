"""The real process: `migrate`, serving with health, reflection, metrics and audit relay, a clean
SIGTERM, and a one-line exit on bad configuration."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from snapsell.common.v1 import address_pb2
from snapsell.seller_admin.v1 import events_pb2, seller_admin_pb2_grpc
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb

from infra import jetstream
from infra.db import service_dsn
from tests.integration.seller_admin.conftest import ACCOUNT_SID, SERVICE
from tests.support.processes import assert_stopped_cleanly, start_service
from tools.dev_keys import DevKeys
from tools.stack import ROOT, RunningService, reset_service_schema

SELLER_NUMBER = "+33677889900"


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"services.{SERVICE}", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
async def env(admin_dsn: str, nats_url: str, token_keys: DevKeys) -> dict[str, str]:
    await reset_service_schema(admin_dsn, SERVICE)
    return {"DATABASE_URL": admin_dsn, "NATS_URL": nats_url}


@pytest.fixture(scope="module")
async def process(env: dict[str, str]) -> AsyncIterator[RunningService]:
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    service = await start_service(SERVICE, env)
    yield service
    service.stop()


def token(token_keys: DevKeys, role: str, tenant_id: str | None = None) -> tuple[tuple[str, str]]:
    sub = "routing" if role == "service" else f"proc-{role}"
    value = token_keys.token(role, tenant_id, sub, audience=SERVICE)
    return (("authorization", f"Bearer {value}"),)


async def test_migrate_applies_every_migration_once(
    env: dict[str, str], admin_dsn: str, process: RunningService
) -> None:
    again = run_cli("migrate", env=env)
    assert again.returncode == 0, again.stderr
    conn = await asyncpg.connect(service_dsn(admin_dsn, SERVICE))
    try:
        names = await conn.fetch("SELECT name FROM seller_admin.schema_migrations ORDER BY name")
    finally:
        await conn.close()
    assert [r["name"] for r in names] == [
        "infra/001_events.sql",
        "infra/002_events_published_at.sql",
        "infra/003_audit_events.sql",
        "seller_admin/001_tenants_channels_seller_phones.sql",
        "seller_admin/002_event_subjects.sql",
        "seller_admin/003_alphanumeric_sender_ids.sql",
    ]


async def test_the_process_serves_health_reflection_and_the_api(
    process: RunningService, token_keys: DevKeys, nats_url: str
) -> None:
    async with grpc.aio.insecure_channel(process.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(
            health_pb2.HealthCheckRequest(service="snapsell.seller_admin.v1.SellerAdminService")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name async for r in replies for s in r.list_services_response.service}
        assert "snapsell.seller_admin.v1.SellerAdminService" in names

        stub = seller_admin_pb2_grpc.SellerAdminServiceStub(channel)
        admin = token(token_keys, "admin")
        await stub.CreateTenant(
            pb.CreateTenantRequest(tenant_id="proc-shop", display_name="Proc"), metadata=admin
        )
        await stub.AddChannel(
            pb.AddChannelRequest(
                tenant_id="proc-shop", address="whatsapp:+14155238886", account_sid=ACCOUNT_SID
            ),
            metadata=admin,
        )
        await stub.AddSellerPhone(
            pb.AddSellerPhoneRequest(phone_number=SELLER_NUMBER),
            metadata=token(token_keys, "owner", "proc-shop"),
        )
        resolved = await stub.ResolveSender(
            pb.ResolveSenderRequest(
                recipient=address_pb2.Address(
                    channel=address_pb2.CHANNEL_WHATSAPP, value="+14155238886"
                ),
                sender=address_pb2.Address(
                    channel=address_pb2.CHANNEL_WHATSAPP, value=SELLER_NUMBER
                ),
                account_sid=ACCOUNT_SID,
            ),
            metadata=token(token_keys, "service"),
        )
        assert (resolved.tenant_id, resolved.sender_role) == ("proc-shop", pb.SENDER_ROLE_SELLER)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ListTenants(pb.ListTenantsRequest())
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async with httpx.AsyncClient() as http:
        metrics = await http.get(
            f"http://127.0.0.1:{process.env['METRICS_PORT']}/metrics", timeout=5
        )
    assert 'method="/snapsell.seller_admin.v1.SellerAdminService/ResolveSender"' in metrics.text
    assert "snapsell_auth_denials_total" in metrics.text

    # The process's relay published the seller's addition.
    client = await jetstream.connect(nats_url, name="seller-admin-process-test")
    try:
        js = client.jetstream()
        subscription = await js.subscribe(
            "seller_admin.v1.seller_phone.added",
            stream="SELLER_ADMIN_EVENTS",
            ordered_consumer=True,
        )
        deadline = time.monotonic() + 10
        found = None
        while found is None and time.monotonic() < deadline:
            try:
                msg = await subscription.next_msg(timeout=1.0)
            except TimeoutError:
                continue
            event = events_pb2.SellerPhoneAdded.FromString(msg.data)
            if event.tenant_id == "proc-shop":
                found = event
        await subscription.unsubscribe()
    finally:
        await client.close()
    assert found is not None and found.masked_address == "+33******00"

    logs = process.logs()
    assert SELLER_NUMBER not in logs
    assert "PRIVATE KEY" not in logs


async def test_sigterm_stops_the_process_cleanly(env: dict[str, str]) -> None:
    service = await start_service(SERVICE, env)
    await asyncio.sleep(0.2)
    assert_stopped_cleanly(service)
    assert '"event":"service.stopped"' in service.logs()


def test_bad_configuration_exits_2_with_one_line(env: dict[str, str]) -> None:
    result = run_cli(env={**env, "NATS_URL": "not a url"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "NATS_URL" in result.stderr
    usage = run_cli("bogus", env=env)
    assert usage.returncode == 2 and "usage" in usage.stderr
