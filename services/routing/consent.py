"""The consent ledger use case shared by the three ways consent changes: a keyword in an inbound
message, an operator's SetConsent, and a send refused by the carrier (Twilio error 21610).

Each change is applied and, when it changed the state, audited as an `OptOutChanged` event in
the caller's transaction, so the event exists exactly when the change committed.
"""

from __future__ import annotations

from snapsell.common.v1 import address_pb2
from snapsell.routing.v1 import events_pb2, routing_pb2

from infra.convert import channel_maps, timestamp
from infra.db import Connection
from infra.events import record_event
from services.routing import store
from services.routing.domain import (
    Channel,
    ConsentChange,
    ConsentOutcome,
    ConsentSource,
    ConsentState,
)

OPT_OUT_RECORDED = "routing.v1.opt_out.recorded"
OPT_OUT_REMOVED = "routing.v1.opt_out.removed"

CHANNEL_TO_PROTO, CHANNEL_FROM_PROTO = channel_maps(Channel)
SOURCE_TO_PROTO = {
    ConsentSource.KEYWORD: routing_pb2.CONSENT_SOURCE_KEYWORD,
    ConsentSource.OPERATOR: routing_pb2.CONSENT_SOURCE_OPERATOR,
    ConsentSource.CARRIER: routing_pb2.CONSENT_SOURCE_CARRIER,
}
STATE_TO_PROTO = {
    ConsentState.OPTED_OUT: routing_pb2.CONSENT_STATE_OPTED_OUT,
    ConsentState.OPTED_IN: routing_pb2.CONSENT_STATE_OPTED_IN,
}


async def apply_consent_change(conn: Connection, change: ConsentChange) -> ConsentOutcome:
    """Apply `change` inside the caller's transaction; audit it when the state changed."""
    outcome = await store.apply_consent(conn, change)
    if outcome is ConsentOutcome.CHANGED:
        contact = change.contact
        event = events_pb2.OptOutChanged(
            tenant_id=contact.tenant_id,
            address=address_pb2.Address(
                channel=CHANNEL_TO_PROTO[contact.channel], value=contact.address
            ),
            state=STATE_TO_PROTO[change.state],
            source=SOURCE_TO_PROTO[change.source],
            message_sid=change.message_sid,
            keyword=change.keyword,
            actor=change.actor,
            reason=change.reason,
            changed_at=timestamp(change.effective_at),
        )
        subject = OPT_OUT_RECORDED if change.state is ConsentState.OPTED_OUT else OPT_OUT_REMOVED
        await record_event(
            conn,
            subject=subject,
            message=event,
            aggregate_id=f"{contact.channel.value}:{contact.address}",
            tenant_id=contact.tenant_id,
            actor=change.actor,
        )
    return outcome
