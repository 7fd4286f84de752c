"""One stack per test module: the Twilio sandbox and routing as real processes; each module
starts the outbox processes it needs through `OutboxStack.start_outbox`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.outbox.stack import OutboxStack
from tools.dev_keys import DevKeys


@pytest.fixture(scope="module")
async def stack(admin_dsn: str, nats_url: str, token_keys: DevKeys) -> AsyncIterator[OutboxStack]:
    running = OutboxStack(admin_dsn, nats_url, token_keys)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()
