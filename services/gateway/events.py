"""Publishes the gateway's events (built in domain.py) to JetStream and answers readiness."""

from __future__ import annotations

import asyncio
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from infra import jetstream
from services.gateway import metrics
from services.gateway.api import PublishError

_PUBLISH_FAILURES = (
    nats.errors.Error,  # timeouts, no responders, closed or stale connections
    nats.js.errors.Error,
    asyncio.TimeoutError,
    OSError,
)


class JetStreamPublisher:
    def __init__(
        self, nc: NatsClient, js: JetStreamContext, stream: str, ack_timeout_s: float
    ) -> None:
        self._nc = nc
        self._js = js
        self._stream = stream
        self._ack_timeout_s = ack_timeout_s
        self._acked = jetstream.AckedPublisher(nc)

    async def start(self) -> None:
        await self._acked.start()

    async def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        """Publish and wait for the stream's acknowledgement (a duplicate counts as stored)."""
        if not self._nc.is_connected:
            raise PublishError("not connected to NATS")
        started = time.perf_counter()
        try:
            await self._acked.publish(
                subject, data, msg_id=msg_id, ack_timeout_s=self._ack_timeout_s
            )
        except _PUBLISH_FAILURES as error:
            raise PublishError(type(error).__name__) from error
        metrics.PUBLISH_DURATION.observe(time.perf_counter() - started)

    async def ready(self) -> bool:
        if not self._nc.is_connected:
            return False
        try:
            await self._js.stream_info(self._stream)
        except _PUBLISH_FAILURES:
            return False
        return True
