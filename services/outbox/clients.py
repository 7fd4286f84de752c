"""gRPC clients of the outbox's peers: routing's `CheckOptOuts`, which the sending pipeline's
consent step (`sending/consent.py`) asks about recipients before each send.

The channel is leaner than `infra.grpc_client.service_channel`: same options (retry on
UNAVAILABLE, keepalive), but the service token goes in each call's metadata instead of through
a client interceptor. Tracing interceptors are kept when tracing is on. (seller_admin's
`ListChannels` is asked through `channels.ChannelDirectory`, over `service_channel`.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc

from infra.auth import TokenProvider
from infra.grpc_client import CHANNEL_OPTIONS
from infra.telemetry import grpc_client_interceptors
from services.outbox.convert import CHANNEL_TO_PROTO
from services.outbox.domain import Channel, Consent

# Routing's documented limit on checks per CheckOptOuts call.
MAX_CHECKS_PER_CALL = 1000

# (tenant, channel, address): what one check asks about.
Recipient = tuple[str, Channel, str]


class ConsentUnavailableError(Exception):
    """Routing could not answer; the message waits (it is neither sent nor blocked)."""


class ConsentChecker(Protocol):
    async def check_many(self, recipients: Sequence[Recipient]) -> list[Consent]:
        """One answer per recipient, in order; ConsentUnavailableError when routing fails."""
        ...


def routing_channel(addr: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        addr, options=list(CHANNEL_OPTIONS), interceptors=grpc_client_interceptors() or None
    )


def _moment(stamp: Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if present else None


# Most answers: never opted out, no inbound message on record (immutable, so shared).
_NOTHING_ON_RECORD = Consent(opted_out=False)


def _consent(reply: routing_pb2.CheckOptOutResponse) -> Consent:
    if not reply.ListFields():
        return _NOTHING_ON_RECORD
    return Consent(
        opted_out=reply.opted_out,
        opted_out_at=_moment(reply.opted_out_at, reply.HasField("opted_out_at")),
        last_inbound_at=_moment(reply.last_inbound_at, reply.HasField("last_inbound_at")),
    )


class RoutingConsentChecker:
    """`routing.CheckOptOuts` (UNAVAILABLE is retried by the channel's service config). A
    recipient asked twice in one batch is asked once; batches over routing's limit are split
    into calls made together."""

    def __init__(
        self, channel: grpc.aio.Channel, tokens: TokenProvider, *, timeout_s: float
    ) -> None:
        self._stub = routing_pb2_grpc.RoutingServiceStub(channel)
        self._tokens = tokens
        self._timeout_s = timeout_s
        self._metadata: tuple[str, tuple[tuple[str, str], ...]] = ("", ())

    async def check_many(self, recipients: Sequence[Recipient]) -> list[Consent]:
        distinct = list(dict.fromkeys(recipients))
        chunks = [
            distinct[i : i + MAX_CHECKS_PER_CALL]
            for i in range(0, len(distinct), MAX_CHECKS_PER_CALL)
        ]
        answers = await asyncio.gather(*(self._ask(chunk) for chunk in chunks))
        by_recipient = {
            key: consent
            for chunk, chunk_answers in zip(chunks, answers, strict=True)
            for key, consent in zip(chunk, chunk_answers, strict=True)
        }
        return [by_recipient[key] for key in recipients]

    async def _ask(self, recipients: Sequence[Recipient]) -> list[Consent]:
        request = routing_pb2.CheckOptOutsRequest()
        add = request.checks.add
        for tenant, channel, value in recipients:
            # The nested address as a dict is built in place (no message built apart, copied).
            add(tenant_id=tenant, address={"channel": CHANNEL_TO_PROTO[channel], "value": value})
        token = self._tokens.token()
        if token != self._metadata[0]:  # renewed about once an hour
            self._metadata = (token, (("authorization", f"Bearer {token}"),))
        try:
            reply = await self._stub.CheckOptOuts(
                request, metadata=self._metadata[1], timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise ConsentUnavailableError(
                f"routing CheckOptOuts failed: {error.code().name} {error.details()}"
            ) from error
        if len(reply.results) != len(recipients):
            raise ConsentUnavailableError(
                f"routing answered {len(reply.results)} checks of {len(recipients)}"
            )
        return [_consent(result) for result in reply.results]
