"""A real gateway process in front of the session's NATS JetStream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import nats
import pytest

from tests.support.gateway import start_gateway
from tools.stack import RunningService


@pytest.fixture(scope="module")
async def gateway(nats_url: str) -> AsyncIterator[RunningService]:
    service = await start_gateway(nats_url)
    yield service
    assert service.stop() == 0, service.logs()


@pytest.fixture
async def http(gateway: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=10) as client:
        yield client


@pytest.fixture
async def js(nats_url: str):
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()
