"""Domain events written in the caller's transaction and relayed to JetStream at least once.

`record_event` inserts a row into the service schema's `events` table inside the transaction
that makes the change, so an event exists exactly when its change committed. `EventRelay`
publishes unpublished rows in order with `Nats-Msg-Id` = event id (JetStream drops a re-publish
after a crash between publish and mark) and marks them published. It is woken by NOTIFY at
commit (debounced: a storm of commits a few ms apart is one relay round) and polls as a
fallback; several replicas share the work with SKIP LOCKED.

An audit-class event (recorded with the `actor` who made the change, and its tenant) is also
published, with the same id and payload, to the AUDIT stream as `audit.<tenant>.<subject>`, with
the audit headers below: who, what, when and for which tenant, whatever the event's type.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf.message import Message
from nats.aio.client import Client as NatsClient

from infra import jetstream, telemetry
from infra.log import get_logger

if TYPE_CHECKING:  # the gateway imports this module's subjects (infra.streams), not asyncpg
    import asyncpg

    from infra.db import Connection

_log = get_logger(__name__)

# Headers of an event's copy on the AUDIT stream (`infra.streams.audit_stream`).
AUDIT_SUBJECT_PREFIX = "audit"
ACTOR_HEADER = "Snapsell-Actor"
TENANT_HEADER = "Snapsell-Tenant"
TARGET_HEADER = "Snapsell-Target"
OCCURRED_AT_HEADER = "Snapsell-Occurred-At"

_INSERT = """
WITH inserted AS (
    INSERT INTO events (subject, aggregate_id, tenant_id, payload, traceparent, actor)
    VALUES ($1, $2, $3, $4, $5, $6)
    RETURNING id
)
SELECT id, pg_notify('events_' || current_schema(), '') FROM inserted
"""

# `_INSERT` for several events, in the given order (ids are time-ordered: the relay's order).
_INSERT_MANY = """
WITH inserted AS (
    INSERT INTO events (subject, aggregate_id, tenant_id, payload, traceparent)
    SELECT e.subject, e.aggregate_id, e.tenant_id, e.payload, $5
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) WITH ORDINALITY
        AS e(subject, aggregate_id, tenant_id, payload, n)
    ORDER BY e.n
    RETURNING id
)
SELECT count(*), pg_notify('events_' || current_schema(), '') FROM inserted
"""

_CLAIM = """
SELECT id, subject, aggregate_id, tenant_id, payload, traceparent, actor, created_at FROM events
WHERE published_at IS NULL
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

_MARK = "UPDATE events SET published_at = now() WHERE id = ANY($1::uuid[])"


async def record_event(
    conn: Connection,
    *,
    subject: str,
    message: Message,
    aggregate_id: str,
    tenant_id: str | None = None,
    actor: str | None = None,
) -> uuid.UUID:
    """Record an event in the current transaction; returns its id. With `actor` (who made the
    change: a token's subject) it is an audit-class event of `tenant_id`: kept for the audit
    retention and copied to the AUDIT stream."""
    if actor is not None and not tenant_id:
        raise ValueError(f"audit event {subject} needs a tenant_id")
    carrier: dict[str, str] = {}
    telemetry.inject(carrier)
    row = await conn.fetchrow(
        _INSERT,
        subject,
        aggregate_id,
        tenant_id,
        message.SerializeToString(),
        carrier.get("traceparent"),
        actor,
    )
    assert row is not None
    event_id: uuid.UUID = row["id"]
    return event_id


@dataclass(frozen=True, slots=True)
class NewEvent:
    subject: str
    message: Message
    aggregate_id: str
    tenant_id: str | None = None


async def record_events(conn: Connection, events: Sequence[NewEvent]) -> None:
    """`record_event` of each event, in order, in one round trip (the current trace context,
    if any, is every event's)."""
    if not events:
        return
    carrier: dict[str, str] = {}
    telemetry.inject(carrier)
    await conn.execute(
        _INSERT_MANY,
        [e.subject for e in events],
        [e.aggregate_id for e in events],
        [e.tenant_id for e in events],
        [e.message.SerializeToString() for e in events],
        carrier.get("traceparent"),
    )


# How long a NOTIFY waits for others before it wakes its listener: commits a few ms apart (a
# trickle of enqueues, a storm of small transactions) then cost one claim or relay round, not
# one each, for a few ms of latency.
NOTIFY_DEBOUNCE_S = 0.005


class DebouncedWakeup:
    """Sets `event` `delay_s` after the first of a run of calls (a LISTEN callback): the calls
    made meanwhile join that one wake-up."""

    def __init__(self, event: asyncio.Event, delay_s: float = NOTIFY_DEBOUNCE_S) -> None:
        self.event = event
        self._delay_s = delay_s
        self._pending: asyncio.TimerHandle | None = None

    def __call__(self, *_: object) -> None:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(self._delay_s, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self.event.set()

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


class EventRelay:
    """Publishes a schema's committed events to JetStream."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        nc: NatsClient,
        schema: str,
        *,
        batch_size: int = 200,
        poll_interval_s: float = 1.0,
    ) -> None:
        self._pool = pool
        self._publisher = jetstream.AckedPublisher(nc)
        self._channel = f"events_{schema}"
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._notified = DebouncedWakeup(self._wake)

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set; database or NATS outages are waited out, never fatal."""
        await self._publisher.start()
        while not stop.is_set():
            try:
                async with self._pool.acquire() as listener:
                    await listener.add_listener(self._channel, self._notified)
                    try:
                        await self._relay_until(stop, listener)
                    finally:
                        self._notified.cancel()
                        if not listener.is_closed():
                            await listener.remove_listener(self._channel, self._notified)
            except Exception as exc:
                _log.warning("events.relay_failed", extra={"fields": {"error": str(exc)}})
                await wait_any(stop, timeout_s=self._poll_interval_s)

    async def _relay_until(self, stop: asyncio.Event, listener: Connection) -> None:
        while not stop.is_set() and not listener.is_closed():
            if await self.relay_once() == self._batch_size:
                continue  # more are waiting
            self._wake.clear()
            await wait_any(self._wake, stop, timeout_s=self._poll_interval_s)

    async def relay_once(self) -> int:
        """Publish one batch; returns how many events were published."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self._batch_size)
            if not rows:
                return 0
            outgoing = [message for row in rows for message in _outgoing(row)]
            await self._publisher.publish_batch(outgoing, ack_timeout_s=5.0)
            await conn.execute(_MARK, [row["id"] for row in rows])
        return len(rows)


def _outgoing(row: asyncpg.Record) -> list[jetstream.Outgoing]:
    """The event on its own subject and, for an audit-class event, its copy on the AUDIT stream
    (a different stream: the shared id de-duplicates each copy in its own stream)."""
    traceparent = row["traceparent"]
    headers = {"traceparent": traceparent} if traceparent else {}
    event_id = str(row["id"])
    messages = [jetstream.Outgoing(row["subject"], row["payload"], event_id, headers or None)]
    if row["actor"] is not None:
        audit_headers = {
            **headers,
            ACTOR_HEADER: row["actor"],
            TENANT_HEADER: row["tenant_id"],
            TARGET_HEADER: row["aggregate_id"],
            OCCURRED_AT_HEADER: row["created_at"].isoformat(),
        }
        messages.append(
            jetstream.Outgoing(
                audit_subject(row["tenant_id"], row["subject"]),
                row["payload"],
                event_id,
                audit_headers,
            )
        )
    return messages


def audit_subject(tenant_id: str, subject: str) -> str:
    """`audit.<tenant>.<event subject>`: a tenant's trail is one subject filter."""
    return f"{AUDIT_SUBJECT_PREFIX}.{tenant_id}.{subject}"


async def wait_any(*events: asyncio.Event, timeout_s: float) -> None:
    """Return when any event is set or after `timeout_s`."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
