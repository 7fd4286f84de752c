"""The use case: route inbound messages, with exactly one effect per MessageSid.

Messages are routed in batches (what one fetch from the stream brought, up to its size); a
batch is one unit of work. Everything routing itself changes for it (ledger rows, consent
ledger, events) is written in ONE Postgres transaction that starts by inserting the batch's
ledger rows in one statement; the consumer acks the stream messages only after it committed. A
message seen again — a redelivery, Twilio retrying the webhook after the JetStream duplicate
window, a second copy in the same batch — conflicts on the ledger's primary key (or is found
in the batch) and changes nothing. Two copies processed at the same time serialise on that row:
the second waits for the first to commit (then it is a duplicate) or roll back (then it does
the work). Rows are always written in a stable order (MessageSid, contact), so two replicas'
batches take their locks in the same order and cannot deadlock; one person's consent
keywords are applied in the order they were received, across their phone channels.

A batch that fails in the database is split in two and each half tried on its own, down to
single messages, so one bad message cannot hold back the others. A peer down (or the database
unreachable) fails the whole batch: every message of it is retried later.

The peers cannot join that transaction, so each call is made safe to repeat instead — a crash
after the call but before the commit makes the message come back and the call happen again:
- `outbox.EnqueueMany` is idempotent per reply on (tenant, key) and the key is derived from the
  MessageSid (`<MessageSid>:consent`), so the repeat returns the first reply's id: one reply,
  never two. It is called inside the transaction, after the consent changes (a reply depends on
  what its change did) and before the commit, which is what makes a reply impossible to lose.
- `live_session.Touch` is not keyed, but touching the same tenant's session again only bumps
  its last activity a second time, which is harmless; live_session records the session's
  creation once, in its own transaction. It is called just before the transaction, so no row
  lock is held while waiting for it. (Only our `MessageRouted.live_session_created` flag can
  read false for a message whose first, crashed attempt actually opened the session.)
- The last inbound time is a running maximum, idempotent by nature. For a message that gets a
  reply it is committed before the transaction: the outbox may check the reply against
  WhatsApp's 24-hour window before our transaction commits, and must see this message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.routing.v1 import events_pb2, routing_pb2

from infra.db import DATABASE_UNAVAILABLE, Connection
from infra.events import NewEvent, record_events
from infra.log import get_logger, mask_phone
from services.routing import store
from services.routing.clients import (
    ComplianceReply,
    LiveSessions,
    PeerUnavailableError,
    ReplySender,
    Sender,
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


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stream message to route. `redelivered=False` (a first delivery) skips the early
    duplicate check: only a webhook re-published after the JetStream duplicate window can then
    be a duplicate, and the ledger insert catches that; every other message saves work."""

    message: gateway_events.MessageReceived
    stream_sequence: int
    redelivered: bool = True


@dataclass(slots=True)
class _Plan:
    """One message of a batch on its way through: what was found and decided for it."""

    message: gateway_events.MessageReceived
    stream_sequence: int
    at: datetime
    sender: Sender | None
    contact: Contact | None = None
    decision: Decision | None = None
    touched: Touched | None = None
    consent: ConsentOutcome = ConsentOutcome.CHANGED  # HELP changes nothing but is answered
    reply_id: str | None = None

    @property
    def sid(self) -> str:
        return self.message.message_sid

    def ledger_entry(self) -> store.LedgerEntry:
        if self.sender is None or self.decision is None:
            return store.LedgerEntry(
                self.sid, RouteOutcome.UNROUTABLE.value, self.stream_sequence, self.at
            )
        return store.LedgerEntry(
            message_sid=self.sid,
            outcome=RouteOutcome.ROUTED.value,
            stream_sequence=self.stream_sequence,
            received_at=self.at,
            tenant_id=self.sender.tenant_id,
            sender_role=self.sender.role.value,
            decision=self.decision.kind.value,
            live_session_id=self.touched.session_id if self.touched else None,
        )

    def last_inbound(self) -> store.Inbound:
        assert self.contact is not None
        return store.Inbound(self.contact, self.at, self.sid)

    def routed(self) -> Routed:
        if self.sender is None:
            return Routed(RouteOutcome.UNROUTABLE)
        return Routed(
            RouteOutcome.ROUTED,
            self.decision,
            self.sender.tenant_id,
            self.touched,
            self.reply_id,
            self.sender.role,
        )


# A whole batch fails the same way on these: splitting it cannot help.
_WHOLE_BATCH_FAILURES: tuple[type[Exception], ...] = (
    PeerUnavailableError,
    *DATABASE_UNAVAILABLE,
)


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
        """One message as a batch of one; raises what `route_batch` would return for it."""
        [outcome] = await self.route_batch([Delivery(message, stream_sequence, redelivered)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def route_batch(self, deliveries: Sequence[Delivery]) -> list[Routed | Exception]:
        """Each delivery's outcome, in order: `Routed`, or the error that kept it from being
        routed — `InvalidInboundError` (never valid), `PeerUnavailableError` or a database
        error (retry later), or another exception (a bug, or a message the database refuses)."""
        outcomes: list[Routed | Exception] = [Routed(RouteOutcome.DUPLICATE)] * len(deliveries)
        todo: dict[str, int] = {}  # MessageSid -> index of its first copy in the batch
        for index, delivery in enumerate(deliveries):
            try:
                validate(delivery.message)
            except InvalidInboundError as error:
                outcomes[index] = error
                continue
            todo.setdefault(delivery.message.message_sid, index)
        routed = await self._route_or_split([deliveries[index] for index in todo.values()])
        for index, outcome in zip(todo.values(), routed, strict=True):
            outcomes[index] = outcome
        return outcomes

    async def _route_or_split(self, deliveries: Sequence[Delivery]) -> list[Routed | Exception]:
        if not deliveries:
            return []
        try:
            return [*await self._route_together(deliveries)]
        except _WHOLE_BATCH_FAILURES as error:
            return [error] * len(deliveries)
        except Exception as error:
            if len(deliveries) == 1:
                return [error]
            _log.warning(
                "routing.batch_split",
                extra={"fields": {"size": len(deliveries), "error": type(error).__name__}},
            )
        half = len(deliveries) // 2
        return [
            *await self._route_or_split(deliveries[:half]),
            *await self._route_or_split(deliveries[half:]),
        ]

    async def _route_together(self, deliveries: Sequence[Delivery]) -> list[Routed]:
        # One connection for the whole batch: each pool release costs a reset round trip.
        async with self._pool.acquire() as conn:
            redelivered = [d.message.message_sid for d in deliveries if d.redelivered]
            done = await store.processed_among(conn, redelivered) if redelivered else set()
            fresh = [d for d in deliveries if d.message.message_sid not in done]
            senders = await asyncio.gather(*(self._senders.resolve(d.message) for d in fresh))
            plans = [self._plan(d, sender) for d, sender in zip(fresh, senders, strict=True)]
            routable = [plan for plan in plans if plan.decision is not None]
            # Committed before, not with, the rest (see the module's docstring).
            await store.record_last_inbound_many(
                conn, [p.last_inbound() for p in routable if p.decision and p.decision.reply]
            )
            await self._touch(routable)
            async with conn.transaction():
                claimed = await store.claim_inbound_many(conn, [p.ledger_entry() for p in plans])
                mine = [plan for plan in plans if plan.sid in claimed]
                await self._apply_consent(conn, mine)
                await store.record_last_inbound_many(
                    conn,
                    [p.last_inbound() for p in mine if p.decision and p.decision.reply is None],
                )
                await self._reply(mine)
                await record_events(conn, [_event(plan) for plan in mine])
        by_sid = {plan.sid: plan.routed() for plan in mine}
        return [
            by_sid.get(d.message.message_sid, Routed(RouteOutcome.DUPLICATE)) for d in deliveries
        ]

    def _plan(self, delivery: Delivery, sender: Sender | None) -> _Plan:
        message = delivery.message
        plan = _Plan(message, delivery.stream_sequence, received_at(message), sender)
        if sender is not None:
            plan.contact = sender_contact(sender.tenant_id, message)
            plan.decision = decide(
                InboundFacts(message.body, len(message.media), message.opt_out_type),
                sender.role,
                self._rules.for_tenant(sender.tenant_id),
            )
        return plan

    async def _touch(self, plans: Sequence[_Plan]) -> None:
        """Before the transaction so no row lock is held during the calls; a repeat (after a
        crash, or for a late duplicate) only bumps the session's activity again."""
        calls = [
            (plan, self._sessions.touch(plan.sender.tenant_id, plan.decision.live_signal, plan.sid))
            for plan in plans
            if plan.sender and plan.decision and plan.decision.live_signal
        ]
        touched = await asyncio.gather(*(call for _, call in calls))
        for (plan, _), touch in zip(calls, touched, strict=True):
            plan.touched = touch

    async def _apply_consent(self, conn: Connection, plans: Sequence[_Plan]) -> None:
        """Each consent keyword's change, person by person in a stable order (the advisory
        locks, `Contact.lock_key`, are taken in that order), each person's in the order they
        were received whatever the phone channel."""
        changes = [
            (
                plan,
                ConsentChange(
                    contact=plan.contact,
                    state=state,
                    effective_at=plan.at,
                    source=ConsentSource.KEYWORD,
                    actor=ACTOR,
                    message_sid=plan.sid,
                    keyword=plan.decision.keyword,
                    tenant_scope=self._rules.for_tenant(plan.contact.tenant_id).consent_scope,
                ),
            )
            for plan in plans
            if plan.contact
            and plan.decision
            and plan.decision.consent
            and (state := _CONSENT_STATE.get(plan.decision.consent)) is not None
        ]
        changes.sort(key=lambda c: (c[1].contact.lock_key, c[1].effective_at, c[0].sid))
        for plan, change in changes:
            plan.consent = await apply_consent_change(conn, change)

    async def _reply(self, plans: Sequence[_Plan]) -> None:
        """One EnqueueMany for every confirmation the batch's consent keywords call for."""
        answering: list[tuple[_Plan, ComplianceReply]] = []
        for plan in plans:
            if plan.contact is None or plan.decision is None:
                continue
            text = consent_reply(plan.decision, plan.consent)
            if text is not None:
                reply = ComplianceReply(
                    plan.contact.tenant_id, plan.message, text, f"{plan.sid}:consent"
                )
                answering.append((plan, reply))
        if not answering:
            return
        sent = await self._replies.send_compliance_replies([reply for _, reply in answering])
        for (plan, _), outcome in zip(answering, sent, strict=True):
            if isinstance(outcome, str):
                plan.reply_id = outcome
                continue
            # The consent change itself must still be recorded; a reply the outbox calls
            # invalid will not become valid by retrying.
            assert plan.contact is not None
            _log.error(
                "routing.reply_rejected",
                extra={
                    "fields": {
                        "tenant_id": plan.contact.tenant_id,
                        "message_sid": plan.sid,
                        "to": mask_phone(plan.contact.address),
                        "error": str(outcome),
                    }
                },
            )


def _event(plan: _Plan) -> NewEvent:
    if plan.sender is None or plan.decision is None:
        unroutable = events_pb2.MessageUnroutable(
            reason=events_pb2.UNROUTABLE_REASON_UNKNOWN_CHANNEL,
            detail="no tenant owns the receiving channel",
            message=plan.message,
            stream_sequence=plan.stream_sequence,
            recorded_at=_now(),
        )
        return NewEvent(MESSAGE_UNROUTABLE, unroutable, plan.sid)
    routed = _routed_event(
        plan.sender.tenant_id, plan.message, plan.sender.role, plan.decision, plan.touched
    )
    return NewEvent(MESSAGE_ROUTED, routed, plan.sid, plan.sender.tenant_id)


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
