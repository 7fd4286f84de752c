"""The load driver's gRPC calls as their real callers make them: outbox Enqueue with routing's
service token, GetMessage with an operator's, routing CheckOptOut with the outbox's; each
retried through outages. An Enqueue is retried
with the same idempotency key, so one whose answer was lost still makes one message."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from snapsell.common.v1 import address_pb2
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc

from infra.auth import ServiceTokenProvider
from infra.grpc_client import service_channel
from tools.dev_keys import DevKeys

T = TypeVar("T")

CALL_TIMEOUT_S = 5.0
# The caller's own mistakes: retrying cannot help, so they fail the run at once.
_CALLER_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
_FIRST_RETRY_S = 0.1
_MAX_RETRY_S = 1.0


def whatsapp(phone: str) -> address_pb2.Address:
    return address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=phone)


class DriverCalls:
    def __init__(
        self, outbox_addr: str, routing_addr: str, keys: DevKeys, *, deadline_s: float
    ) -> None:
        as_routing = ServiceTokenProvider(keys.key("routing"), "outbox")
        as_outbox = ServiceTokenProvider(keys.key("outbox"), "routing")
        self._operator = (
            ("authorization", f"Bearer {keys.token('admin', sub='chaos', audience='outbox')}"),
        )
        self._outbox_channel = service_channel(outbox_addr, token_provider=as_routing)
        self._routing_channel = service_channel(routing_addr, token_provider=as_outbox)
        self._outbox = outbox_pb2_grpc.OutboxServiceStub(self._outbox_channel)
        self._routing = routing_pb2_grpc.RoutingServiceStub(self._routing_channel)
        self._deadline = time.monotonic() + deadline_s
        self.failed_attempts: Counter[str] = Counter()  # "<method> <code>" -> count

    async def close(self) -> None:
        await self._outbox_channel.close()
        await self._routing_channel.close()

    async def enqueue(self, tenant_id: str, sender: str, to: str, body: str, key: str) -> str:
        request = outbox_pb2.EnqueueRequest(
            tenant_id=tenant_id,
            sender=sender,
            recipient=whatsapp(to),
            body=body,
            kind=outbox_pb2.MESSAGE_KIND_CONVERSATIONAL,
            idempotency_key=key,
            correlation_id=key,
        )
        reply = await self._retried(
            "Enqueue", lambda: self._outbox.Enqueue(request, timeout=CALL_TIMEOUT_S)
        )
        return reply.message_id

    async def status(self, tenant_id: str, message_id: str) -> int:
        request = outbox_pb2.GetMessageRequest(tenant_id=tenant_id, message_id=message_id)
        reply = await self._retried(
            "GetMessage",
            lambda: self._outbox.GetMessage(
                request, metadata=self._operator, timeout=CALL_TIMEOUT_S
            ),
        )
        return int(reply.message.status)

    async def consent(self, tenant_id: str, phone: str) -> routing_pb2.CheckOptOutResponse:
        request = routing_pb2.CheckOptOutRequest(tenant_id=tenant_id, address=whatsapp(phone))
        return await self._retried(
            "CheckOptOut", lambda: self._routing.CheckOptOut(request, timeout=CALL_TIMEOUT_S)
        )

    async def until(
        self, check: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, every_s: float = 0.2
    ) -> T:
        """Call `check` until `done(answer)`; the answer. Fails the run after the deadline."""
        while True:
            answer = await check()
            if done(answer):
                return answer
            if time.monotonic() > self._deadline:
                raise AssertionError(f"still not done at the deadline: {answer!r}")
            await asyncio.sleep(every_s)

    async def _retried(self, method: str, call: Callable[[], Awaitable[T]]) -> T:
        delay = _FIRST_RETRY_S
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                if error.code() in _CALLER_ERRORS:
                    raise
                self.failed_attempts[f"{method} {error.code().name}"] += 1
                if time.monotonic() > self._deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_S)
