"""The security suite: one test per attack a review found, each written so that it fails on the
code before the fix. Tests here use the same real PostgreSQL, NATS and gRPC fixtures as the
integration tests; the attacker's side is whatever a caller outside the trust boundary controls
(webhook bodies and headers, RPC fields and page tokens, tokens and their claims)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from infra import jetstream
from tests.e2e.harness import Harness
from tools.dev_keys import DevKeys
from tools.stack import SystemStack, start_system


@pytest.fixture(scope="module")
async def system(
    admin_dsn: str, nats_url: str, token_keys: DevKeys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SystemStack]:
    """Every service its own process, as `make run` starts them, shared by a module's tests.
    Not wider: other modules start services of their own on the same database and streams, and
    two outboxes (or two routings) would share the work their tests count."""
    stack = await start_system(
        admin_dsn, nats_url, token_keys, tmp_path_factory.mktemp("security"), trace=False
    )
    try:
        yield stack
    finally:
        await stack.stop()


@pytest.fixture(scope="module")
async def harness(system: SystemStack) -> AsyncIterator[Harness]:
    """The end-to-end tests' driver: signed webhooks, gRPC APIs, events, the Twilio sandbox."""
    nats = await jetstream.connect(system.nats_url, name="security-tests")
    harness = Harness(system, nats)
    try:
        yield harness
    finally:
        await harness.close()
        await nats.close()
