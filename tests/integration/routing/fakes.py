"""Builders of inbound messages as the gateway publishes them, and small hand-written fakes of
routing's peers (seller_admin, live_session, outbox) for the use-case tests."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events

from services.routing.clients import (
    ComplianceReply,
    PeerUnavailableError,
    ReplyRejectedError,
    Sender,
    Touched,
)
from services.routing.domain import LiveSignalKind, SenderRole

SHOP_NUMBER = "+14155238886"
SELLER = "+33600000001"

_sids = itertools.count(1)


def whatsapp(value: str) -> address_pb2.Address:
    return address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=value)


def inbound(
    body: str,
    *,
    sender: str = "+33611111111",
    sid: str | None = None,
    at: datetime | None = None,
    media: int = 0,
    opt_out_type: str = "",
    to: str = SHOP_NUMBER,
) -> gateway_events.MessageReceived:
    """A MessageReceived as the gateway publishes it."""
    received = Timestamp()
    received.FromDatetime(at or datetime.now(UTC))
    message = gateway_events.MessageReceived(
        message_sid=sid or f"SM{next(_sids):032x}",
        account_sid="AC" + "0" * 32,
        sender=whatsapp(sender),
        recipient=whatsapp(to),
        body=body,
        opt_out_type=opt_out_type,
        received_at=received,
    )
    for index in range(media):
        message.media.add(url=f"https://media.example/{index}", content_type="image/jpeg")
    return message


def minutes_ago(minutes: float) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)


class FakeSenders:
    """seller_admin.ResolveSender: the shop number belongs to tenant "shop-1"; SELLER is a
    seller; any other receiving number is unknown."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    async def resolve(self, message: gateway_events.MessageReceived) -> Sender | None:
        self.calls += 1
        if self.down:
            raise PeerUnavailableError("seller_admin.ResolveSender: UNAVAILABLE")
        if message.recipient.value != SHOP_NUMBER:
            return None
        role = SenderRole.SELLER if message.sender.value == SELLER else SenderRole.CLIENT
        return Sender("shop-1", role)


class FakeSessions:
    """live_session.Touch: a seller's message opens a tenant's session, an item code only
    extends one (as `existing_only` does)."""

    def __init__(self) -> None:
        self.down = False
        self.touches: list[tuple[str, LiveSignalKind, str]] = []
        self.active: set[str] = set()

    async def touch(
        self, tenant_id: str, signal: LiveSignalKind, correlation_id: str
    ) -> Touched | None:
        if self.down:
            raise PeerUnavailableError("live_session.Touch: UNAVAILABLE")
        self.touches.append((tenant_id, signal, correlation_id))
        if tenant_id in self.active:
            return Touched(f"session-{tenant_id}", created=False)
        if signal is LiveSignalKind.ITEM_CODE:
            return None
        self.active.add(tenant_id)
        return Touched(f"session-{tenant_id}", created=True)


class FakeReplies:
    """outbox.EnqueueMany, idempotent on (tenant, key) like the real one; `calls` counts
    calls, not replies."""

    def __init__(self) -> None:
        self.messages: dict[tuple[str, str], str] = {}
        self.calls = 0
        self.reject = False
        self.down = False

    async def send_compliance_replies(
        self, replies: Sequence[ComplianceReply]
    ) -> list[str | ReplyRejectedError]:
        self.calls += 1
        if self.down:
            raise PeerUnavailableError("outbox.EnqueueMany: UNAVAILABLE")
        answers: list[str | ReplyRejectedError] = []
        for reply in replies:
            if self.reject:
                answers.append(ReplyRejectedError("outbox.EnqueueMany: recipient is not valid"))
                continue
            self.messages.setdefault((reply.tenant_id, reply.idempotency_key), reply.body)
            answers.append(f"out-{reply.idempotency_key}")
        return answers
