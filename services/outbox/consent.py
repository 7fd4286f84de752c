"""Asking routing, which owns the consent ledger, about a recipient before each send.

This is the outbox's hottest RPC (one per send), so its channel is leaner than
`infra.grpc_client.service_channel`: same options (retry on UNAVAILABLE, keepalive), but the
service token goes in each call's metadata instead of through a client interceptor, which in
grpc.aio costs an extra task and several allocations per call. Tracing interceptors are kept
when tracing is on. Checks of the same recipient that overlap in time share one call.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc

from infra.auth import TokenProvider
from infra.grpc_client import CHANNEL_OPTIONS
from infra.telemetry import grpc_client_interceptors
from services.outbox.domain import Channel, Consent
from services.outbox.events import address

_Key = tuple[str, Channel, str]


class ConsentUnavailableError(Exception):
    """Routing could not answer; the message waits (it is neither sent nor blocked)."""


class ConsentChecker(Protocol):
    async def check(self, tenant_id: str, channel: Channel, value: str) -> Consent: ...


def routing_channel(addr: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        addr, options=list(CHANNEL_OPTIONS), interceptors=grpc_client_interceptors() or None
    )


def _moment(stamp: Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if present else None


class RoutingConsentChecker:
    """`routing.CheckOptOut` (UNAVAILABLE is retried by the channel's service config)."""

    def __init__(
        self, channel: grpc.aio.Channel, tokens: TokenProvider, *, timeout_s: float
    ) -> None:
        self._stub = routing_pb2_grpc.RoutingServiceStub(channel)
        self._tokens = tokens
        self._timeout_s = timeout_s
        self._pending: dict[_Key, asyncio.Future[Consent]] = {}
        self._metadata: tuple[str, tuple[tuple[str, str], ...]] = ("", ())

    async def check(self, tenant_id: str, channel: Channel, value: str) -> Consent:
        key = (tenant_id, channel, value)
        shared = self._pending.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        future: asyncio.Future[Consent] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            consent = await self._ask(tenant_id, channel, value)
        except Exception as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning when nobody shared it
            raise
        else:
            future.set_result(consent)
            return consent
        finally:
            del self._pending[key]
            if not future.done():  # cancelled: those sharing the call are cancelled too
                future.cancel()

    async def _ask(self, tenant_id: str, channel: Channel, value: str) -> Consent:
        request = routing_pb2.CheckOptOutRequest(
            tenant_id=tenant_id, address=address(channel, value)
        )
        token = self._tokens.token()
        if token != self._metadata[0]:  # renewed about once an hour
            self._metadata = (token, (("authorization", f"Bearer {token}"),))
        metadata = self._metadata[1]
        try:
            reply = await self._stub.CheckOptOut(
                request, metadata=metadata, timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise ConsentUnavailableError(
                f"routing CheckOptOut failed: {error.code().name} {error.details()}"
            ) from error
        return Consent(
            opted_out=reply.opted_out,
            opted_out_at=_moment(reply.opted_out_at, reply.HasField("opted_out_at")),
            last_inbound_at=_moment(reply.last_inbound_at, reply.HasField("last_inbound_at")),
        )
