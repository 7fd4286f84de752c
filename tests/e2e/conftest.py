"""One whole system for the e2e package (every service its own process, exactly as `make run`
starts them), and shops set up the way an operator and a dashboard would: through the operator
CLI and through seller_admin's gRPC API."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infra import jetstream
from tests.e2e.harness import (
    Harness,
    Shop,
    new_business_number,
    new_mobile,
    shop_from_api,
)
from tools.dev_keys import DevKeys
from tools.stack import SystemStack, start_system

# Short enough for the sweeper test: the window's minimum, swept every second.
LIVE_WINDOW_S = 60.0
# The one tenant whose end-of-live summaries go out as this WhatsApp template outside the
# 24-hour window (the catalog's per-tenant setting).
TEMPLATE_TENANT = "live-template"
SUMMARY_CONTENT_SID = "HX" + "5a" * 16
FAST_ENV = {
    "live_session": {
        "LIVE_SESSION_INACTIVITY_WINDOW_MINUTES": "1",
        "LIVE_SESSION_SWEEP_INTERVAL_SECONDS": "1",
    },
    "routing": {"ROUTING_RETRY_DELAY_CAP_SECONDS": "1"},
    "live_catalog": {
        "LIVE_CATALOG_TENANT_SETTINGS": json.dumps(
            {TEMPLATE_TENANT: {"summary_content_sid": SUMMARY_CONTENT_SID}}
        )
    },
    "outbox": {
        "OUTBOX_POLL_INTERVAL_SECONDS": "0.2",
        "OUTBOX_BACKOFF_BASE_SECONDS": "0.1",
        "OUTBOX_BACKOFF_CAP_SECONDS": "1",
        "OUTBOX_CONSENT_RETRY_SECONDS": "0.2",
    },
}


@pytest.fixture(scope="package")
async def system(
    admin_dsn: str, nats_url: str, token_keys: DevKeys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SystemStack]:
    work_dir: Path = tmp_path_factory.mktemp("e2e")
    stack = await start_system(admin_dsn, nats_url, token_keys, work_dir, service_env=FAST_ENV)
    try:
        yield stack
    finally:
        await stack.stop()


@pytest.fixture(scope="package")
async def harness(system: SystemStack) -> AsyncIterator[Harness]:
    nats = await jetstream.connect(system.nats_url, name="e2e-tests")
    harness = Harness(system, nats)
    try:
        yield harness
    finally:
        await harness.close()
        await nats.close()


def _cli_json(stack: SystemStack, *args: str) -> dict[str, object]:
    done = stack.cli(*args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def shop_from_cli(stack: SystemStack, name: str) -> Shop:
    """What an operator types to bootstrap a shop (README), owner token included."""
    tenant = f"{name}-{secrets.token_hex(3)}"
    number, seller = new_business_number(), new_mobile()
    _cli_json(stack, "create-tenant", "--tenant", tenant, "--name", name.title())
    _cli_json(stack, "add-channel", "--tenant", tenant, "--address", f"whatsapp:{number}")
    _cli_json(stack, "add-seller", "--tenant", tenant, "--phone", seller)
    audiences = [
        arg for name in ("routing", "outbox", "live_session") for arg in ("--audience", name)
    ]
    issued = stack.cli(
        "issue-token", "--role", "owner", "--tenant", tenant, "--sub", "owner", *audiences
    )
    assert issued.returncode == 0, issued.stderr
    return Shop(tenant, number, seller, issued.stdout.strip())


@pytest.fixture(scope="package")
def cli_shop(system: SystemStack) -> Shop:
    return shop_from_cli(system, "chez-marie")


@pytest.fixture(scope="package")
async def api_shop(system: SystemStack) -> Shop:
    return await shop_from_api(system, "la-boutique")
