"""The use case: route one inbound message, with exactly one effect per MessageSid.

Everything routing itself changes (ledger row, consent ledger, events) is written in ONE
Postgres transaction that starts by inserting the ledger row; the consumer acks the stream
message only after it committed. A message seen again — a redelivery, Twilio retrying the
webhook after the JetStream duplicate window — conflicts on the ledger's primary key and changes
nothing. Two copies processed at the same time serialise on that row: the second waits for the
first to commit (then it is a duplicate) or roll back (then it does the work).

The peers cannot join that transaction, so each call is made safe to repeat instead — a crash
after the call but before the commit makes the message come back and the call happen again:
- `outbox.Enqueue` is idempotent on (tenant, key) and the key is derived from the MessageSid
  (`<MessageSid>:consent`), so the repeat returns the first reply's id: one reply, never two.
  It is called inside the transaction, after the consent change (the reply depends on what the
  change did) and before the commit, which is what makes the reply impossible to lose.
- `live_session.Touch` is not keyed, but touching the same tenant's session again only bumps
  its last activity a second time, which is harmless; live_session records the session's
  creation once, in its own transaction. It is called just before the transaction, so no row
  lock is held while waiting for it. (Only our `MessageRouted.live_session_created` flag can
  read false for a message whose first, crashed attempt actually opened the session.)
- The last inbound time is a running maximum, idempotent by nature.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.routing.v1 import events_pb2, routing_pb2

from infra.db import Connection
from infra.events import record_event
from infra.log import get_logger, mask_phone
from services.routing import store
from services.routing.clients import (
    LiveSessions,
    ReplyRejectedError,
    ReplySender,
    SenderDirectory,
    Touched,
)
from services.routing.consent import CHANNEL_FROM_PROTO, apply_consent_change
from services.routing.domain import (
    ConsentChange,
    ConsentIntent,
    ConsentOutcome,
    ConsentSource,
    ConsentState,
    Contact,
    Decision,
    DecisionKind,
    InboundFacts,
    InvalidAddressError,
    RulesBook,
    SenderRole,
    consent_reply,
    decide,
    normalise_address,
)

_log = get_logger(__name__)

MESSAGE_ROUTED = "routing.v1.message.routed"
MESSAGE_UNROUTABLE = "routing.v1.message.unroutable"
ACTOR = "routing"


class RouteOutcome(StrEnum):
    ROUTED = "routed"
    UNROUTABLE = "unroutable"
    DUPLICATE = "duplicate"


class InvalidInboundError(ValueError):
    """A decoded MessageReceived that lacks what routing needs (MessageSid, From, To)."""


_DECISION_TO_PROTO = {
    DecisionKind.OPT_OUT: events_pb2.ROUTING_DECISION_OPT_OUT,
    DecisionKind.OPT_IN: events_pb2.ROUTING_DECISION_OPT_IN,
    DecisionKind.HELP: events_pb2.ROUTING_DECISION_HELP,
    DecisionKind.LIVE_SIGNAL: events_pb2.ROUTING_DECISION_LIVE_SIGNAL,
    DecisionKind.CONVERSATION: events_pb2.ROUTING_DECISION_CONVERSATION,
}
_ROLE_TO_PROTO = {
    SenderRole.SELLER: routing_pb2.SENDER_ROLE_SELLER,
    SenderRole.CLIENT: routing_pb2.SENDER_ROLE_CLIENT,
}
_CONSENT_STATE = {
    ConsentIntent.OPT_OUT: ConsentState.OPTED_OUT,
    ConsentIntent.OPT_IN: ConsentState.OPTED_IN,
}


def received_at(message: gateway_events.MessageReceived) -> datetime:
    if message.HasField("received_at"):
        return message.received_at.ToDatetime(tzinfo=UTC)
    return datetime.now(UTC)


def sender_contact(tenant_id: str, message: gateway_events.MessageReceived) -> Contact:
    """Keyed exactly as CheckOptOut keys its lookups (normalised), so the outbox finds it."""
    channel = CHANNEL_FROM_PROTO[message.sender.channel]
    try:
        address = normalise_address(channel, message.sender.value)
    except InvalidAddressError:  # e.g. an SMS short code: keep it as Twilio gave it
        address = message.sender.value.strip()
    return Contact(tenant_id, channel, address)


def validate(message: gateway_events.MessageReceived) -> None:
    if not message.message_sid:
        raise InvalidInboundError("MessageReceived without message_sid")
    if not message.account_sid:
        raise InvalidInboundError("MessageReceived without account_sid")
    if not message.sender.value or message.sender.channel not in CHANNEL_FROM_PROTO:
        raise InvalidInboundError("MessageReceived without a usable sender address")
    if not message.recipient.value or message.recipient.channel not in CHANNEL_FROM_PROTO:
        raise InvalidInboundError("MessageReceived without a usable recipient address")


@dataclass(frozen=True, slots=True)
class Routed:
    outcome: RouteOutcome
    decision: Decision | None = None
    tenant_id: str | None = None
    touched: Touched | None = None
    reply_message_id: str | None = None
    sender_role: SenderRole | None = None


class InboundRouter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        senders: SenderDirectory,
        sessions: LiveSessions,
        replies: ReplySender,
        rules: RulesBook,
    ) -> None:
        self._pool = pool
        self._senders = senders
        self._sessions = sessions
        self._replies = replies
        self._rules = rules

    async def route(
        self,
        message: gateway_events.MessageReceived,
        *,
        stream_sequence: int,
        redelivered: bool = True,
    ) -> Routed:
        """Raises PeerUnavailableError (retry later) or InvalidInboundError (never valid).

        `redelivered=False` (a first delivery) skips the early duplicate check: only a webhook
        re-published after the JetStream duplicate window can then be a duplicate, and the
        ledger insert catches that; every other message saves a round trip."""
        validate(message)
        # One connection for the whole message: each pool release costs a reset round trip.
        async with self._pool.acquire() as conn:
            if redelivered and await store.is_processed(conn, message.message_sid):
                return Routed(RouteOutcome.DUPLICATE)
            sender = await self._senders.resolve(message)
            at = received_at(message)
            if sender is None:
                async with conn.transaction():
                    return await self._unroutable(conn, message, stream_sequence, at)
            contact = sender_contact(sender.tenant_id, message)
            decision = decide(
                InboundFacts(message.body, len(message.media), message.opt_out_type),
                sender.role,
                self._rules.for_tenant(sender.tenant_id),
            )
            if decision.reply is not None:
                # Committed before, not with, the rest: the outbox may check the reply we
                # enqueue against WhatsApp's 24-hour window before our transaction commits, and
                # must see this message. Keeping the newest time is idempotent, so it is safe.
                await store.record_last_inbound(conn, contact, at, message.message_sid)
            touched = None
            if decision.live_signal is not None:
                # Before the transaction so no row lock is held during the call; a repeat (after
                # a crash, or for a late duplicate) only bumps the session's activity again.
                touched = await self._sessions.touch(
                    sender.tenant_id, decision.live_signal, message.message_sid
                )
            async with conn.transaction():
                entry = store.LedgerEntry(
                    message_sid=message.message_sid,
                    outcome=RouteOutcome.ROUTED.value,
                    stream_sequence=stream_sequence,
                    received_at=at,
                    tenant_id=sender.tenant_id,
                    sender_role=sender.role.value,
                    decision=decision.kind.value,
                    live_session_id=touched.session_id if touched else None,
                )
                if not await store.claim_inbound(conn, entry):
                    return Routed(RouteOutcome.DUPLICATE)
                reply_id = await self._apply_consent(conn, message, contact, decision, at)
                if decision.reply is None:
                    await store.record_last_inbound(conn, contact, at, message.message_sid)
                await record_event(
                    conn,
                    subject=MESSAGE_ROUTED,
                    message=_routed_event(
                        sender.tenant_id, message, sender.role, decision, touched
                    ),
                    aggregate_id=message.message_sid,
                    tenant_id=sender.tenant_id,
                )
        return Routed(
            RouteOutcome.ROUTED, decision, sender.tenant_id, touched, reply_id, sender.role
        )

    async def _apply_consent(
        self,
        conn: Connection,
        message: gateway_events.MessageReceived,
        contact: Contact,
        decision: Decision,
        at: datetime,
    ) -> str | None:
        if decision.consent is None:
            return None
        outcome = ConsentOutcome.CHANGED  # HELP changes nothing but is always answered
        state = _CONSENT_STATE.get(decision.consent)
        if state is not None:
            change = ConsentChange(
                contact=contact,
                state=state,
                effective_at=at,
                source=ConsentSource.KEYWORD,
                actor=ACTOR,
                message_sid=message.message_sid,
                keyword=decision.keyword,
            )
            outcome = await apply_consent_change(conn, change)
        reply = consent_reply(decision, outcome)
        if reply is None:
            return None
        try:
            return await self._replies.send_compliance_reply(
                contact.tenant_id, message, reply, f"{message.message_sid}:consent"
            )
        except ReplyRejectedError as error:
            # The consent change itself must still be recorded; a reply the outbox calls invalid
            # will not become valid by retrying.
            _log.error(
                "routing.reply_rejected",
                extra={
                    "fields": {
                        "tenant_id": contact.tenant_id,
                        "message_sid": message.message_sid,
                        "to": mask_phone(contact.address),
                        "error": str(error),
                    }
                },
            )
            return None

    async def _unroutable(
        self,
        conn: Connection,
        message: gateway_events.MessageReceived,
        stream_sequence: int,
        at: datetime,
    ) -> Routed:
        entry = store.LedgerEntry(
            message_sid=message.message_sid,
            outcome=RouteOutcome.UNROUTABLE.value,
            stream_sequence=stream_sequence,
            received_at=at,
        )
        if not await store.claim_inbound(conn, entry):
            return Routed(RouteOutcome.DUPLICATE)
        event = events_pb2.MessageUnroutable(
            reason=events_pb2.UNROUTABLE_REASON_UNKNOWN_CHANNEL,
            detail="no tenant owns the receiving channel",
            message=message,
            stream_sequence=stream_sequence,
            recorded_at=_now(),
        )
        await record_event(
            conn, subject=MESSAGE_UNROUTABLE, message=event, aggregate_id=message.message_sid
        )
        return Routed(RouteOutcome.UNROUTABLE)


def _routed_event(
    tenant_id: str,
    message: gateway_events.MessageReceived,
    role: SenderRole,
    decision: Decision,
    touched: Touched | None,
) -> events_pb2.MessageRouted:
    return events_pb2.MessageRouted(
        tenant_id=tenant_id,
        sender_role=_ROLE_TO_PROTO[role],
        decision=_DECISION_TO_PROTO[decision.kind],
        live_session_id=touched.session_id if touched else "",
        live_session_created=touched.created if touched else False,
        keyword=decision.keyword,
        message=message,
        routed_at=_now(),
    )


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp
