"""Who changed what for a tenant, and when: the AUDIT stream read back for `ListAuditRecords`.

Every service's audit-class events (seller phones and channels here, consent in routing,
dead-letter redrives and discards in the outbox) are copied by infra's event relay to
`audit.<tenant>.<event subject>`, with headers naming the actor, the target and the commit time
(`infra.events`); the stream keeps them `AUDIT_STREAM_MAX_AGE_DAYS` (`infra.streams`). A query
reads one tenant's subject from `since` with an ephemeral ordered consumer (what seller_admin's
NATS user may create on AUDIT, infra/nats_users.py), exactly as many messages as the consumer
had to deliver when it was created, and keeps those committed in [since, until], oldest first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from snapsell.outbox.v1 import events_pb2 as outbox_events
from snapsell.routing.v1 import events_pb2 as routing_events
from snapsell.seller_admin.v1 import events_pb2 as seller_admin_events

from infra.events import (
    ACTOR_HEADER,
    OCCURRED_AT_HEADER,
    TARGET_HEADER,
    TENANT_HEADER,
    audit_subject,
)
from infra.streams import AUDIT_STREAM

# The most records one answer carries; a busier range is answered in several calls.
MAX_RECORDS = 1000
# Each message of an ordered consumer arrives well within this unless NATS is in trouble.
_NEXT_MESSAGE_TIMEOUT_S = 5.0
# The payload type of each audit-class event, to show what it changed.
_PAYLOADS: Mapping[str, type[Message]] = {
    "seller_admin.v1.tenant.created": seller_admin_events.TenantCreated,
    "seller_admin.v1.channel.added": seller_admin_events.ChannelAdded,
    "seller_admin.v1.channel.removed": seller_admin_events.ChannelRemoved,
    "seller_admin.v1.seller_phone.added": seller_admin_events.SellerPhoneAdded,
    "seller_admin.v1.seller_phone.removed": seller_admin_events.SellerPhoneRemoved,
    "routing.v1.opt_out.recorded": routing_events.OptOutChanged,
    "routing.v1.opt_out.removed": routing_events.OptOutChanged,
    "outbox.v1.message.redriven": outbox_events.MessageRedriven,
    "outbox.v1.message.discarded": outbox_events.MessageDiscarded,
}


@dataclass(frozen=True, slots=True)
class AuditRecord:
    occurred_at: datetime
    tenant_id: str
    actor: str
    action: str
    target: str
    # The event as its JSON mapping (empty for a type this reader does not know).
    details: dict[str, Any]
    event_id: str


@dataclass(frozen=True, slots=True)
class AuditPage:
    records: list[AuditRecord]
    truncated: bool


class AuditTrail:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def records(self, tenant_id: str, since: datetime, until: datetime) -> AuditPage:
        """The tenant's changes committed in [since, until], oldest first (at most
        `MAX_RECORDS`). An event is published after its commit, so nothing committed at or
        after `since` is in the stream before `since`."""
        subject_filter = audit_subject(tenant_id, ">")
        subscription = await self._js.subscribe(
            subject_filter,
            stream=AUDIT_STREAM,
            ordered_consumer=True,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_TIME,
                # The stream's clock may lag the database's a little: start a minute early.
                opt_start_time=since - timedelta(minutes=1),
            ),
        )
        try:
            info = await subscription.consumer_info()
            delivered = info.delivered.consumer_seq if info.delivered else None
            found = []
            for _ in range((info.num_pending or 0) + (delivered or 0)):
                record = _record(await subscription.next_msg(timeout=_NEXT_MESSAGE_TIMEOUT_S))
                if since <= record.occurred_at <= until:
                    found.append(record)
        finally:
            await subscription.unsubscribe()
        found.sort(key=lambda record: (record.occurred_at, record.event_id))
        return AuditPage(found[:MAX_RECORDS], truncated=len(found) > MAX_RECORDS)


def _record(msg: Msg) -> AuditRecord:
    headers = msg.headers or {}
    # `audit.<tenant>.<event subject>`
    action = msg.subject.split(".", 2)[2]
    return AuditRecord(
        occurred_at=datetime.fromisoformat(headers[OCCURRED_AT_HEADER]),
        tenant_id=headers[TENANT_HEADER],
        actor=headers[ACTOR_HEADER],
        action=action,
        target=headers[TARGET_HEADER],
        details=_details(action, msg.data),
        event_id=headers.get("Nats-Msg-Id", ""),
    )


def _details(action: str, payload: bytes) -> dict[str, Any]:
    payload_type = _PAYLOADS.get(action)
    if payload_type is None:
        return {}
    try:
        event = payload_type.FromString(payload)
    except DecodeError:
        return {}
    return json_format.MessageToDict(event)
