"""The reservation SQL of the live_catalog service: claims, promotions, releases, hold expiry.

Concurrency, under READ COMMITTED:
- A claim is ONE conditional UPDATE of the item row: it adds the units to `held` when they fit
  (held + confirmed + quantity <= stock, and no earlier claim is waiting), else counts one more
  waiter; `RETURNING old/new` tells which. The row lock it takes orders every claim, cancel,
  confirmation and promotion of that item, and the CHECK `items_units_within_stock` makes an
  oversell impossible even for a bug in this file.
- A batch's claims on one item, in received_at order, are decided together by ONE conditional
  UPDATE of the item row (`take_in_order`) with the same rule applied claim after claim: the
  granted ones are a prefix (units so far fit, and no earlier claim waits), every later one
  waits, exactly as the claims one UPDATE each would have been decided.
- Every transaction that changes an item locks the item row before any of its reservations, so
  two of them cannot deadlock; the waitlist head is read after that lock, so a unit freed by one
  transaction is promoted by it, and a waiter that committed first is seen.
- A reservation leaves `held` only through a conditional UPDATE (`WHERE status = 'held'`): a
  cancel racing the hold sweeper (or two sweepers) frees each unit once, hence one promotion.
- The hold sweeper locks items with FOR UPDATE SKIP LOCKED, so replicas share the work.
- Events and the replies to send are written in the same transaction as the change.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from infra.db import Connection
from infra.events import record_event
from services.live_catalog import events
from services.live_catalog.domain import (
    Channel,
    Contact,
    Item,
    ItemStatus,
    ReleaseReason,
    Replies,
    ReplyRoute,
    Reservation,
    ReservationStatus,
)

ITEM_COLUMNS = (
    "id, tenant_id, session_id, code, title, price_cents, currency, stock, held, confirmed,"
    " waiting, max_per_client, status, created_at, updated_at"
)
RESERVATION_COLUMNS = (
    "id, tenant_id, session_id, item_id, client_channel, client_value, quantity, status,"
    " release_reason, message_sid, received_at, expires_at, updated_at, reply_from, account_sid"
)


def _qualified(prefix: str, columns: str) -> str:
    return ", ".join(f"{prefix}.{c.strip()}" for c in columns.split(","))


_FITS = """i.held + i.confirmed + $2 <= i.stock AND NOT EXISTS (
    SELECT 1 FROM reservations w
    WHERE w.item_id = i.id AND w.status = 'waiting' AND (w.received_at, w.message_sid) < ($3, $4)
)"""

# The claim: one conditional UPDATE (see the module docstring).
_CLAIM = f"""
UPDATE items AS i SET
    held = i.held + CASE WHEN {_FITS} THEN $2 ELSE 0 END,
    waiting = i.waiting + CASE WHEN {_FITS} THEN 0 ELSE 1 END,
    updated_at = $5
WHERE i.id = $1 AND i.status = 'open'
RETURNING new.held > old.held AS granted, {_qualified("new", ITEM_COLUMNS)}
"""

# The claims of one batch on one item ($2.., in received_at order) decided by one conditional
# UPDATE: claim n is granted when the units of claims 1..n fit and no reservation received
# before it waits (see the module docstring); the granted ones are then a prefix.
_CLAIM_IN_ORDER = f"""
UPDATE items AS i SET (held, waiting, updated_at) = (
    SELECT i.held + coalesce(max(c.units_so_far) FILTER (WHERE c.granted), 0),
        i.waiting + count(*) FILTER (WHERE NOT c.granted),
        $5::timestamptz
    FROM (
        SELECT u.units_so_far,
            i.held + i.confirmed + u.units_so_far <= i.stock AND NOT EXISTS (
                SELECT 1 FROM reservations w
                WHERE w.item_id = i.id AND w.status = 'waiting'
                    AND (w.received_at, w.message_sid) < (u.received_at, u.message_sid)
            ) AS granted
        FROM (
            SELECT q.received_at, q.message_sid,
                sum(q.quantity) OVER (ORDER BY q.n) AS units_so_far
            FROM unnest($2::int[], $3::timestamptz[], $4::text[]) WITH ORDINALITY
                AS q(quantity, received_at, message_sid, n)
        ) u
    ) c
)
WHERE i.id = $1 AND i.status = 'open'
RETURNING new.held - old.held AS units_granted, {_qualified("new", ITEM_COLUMNS)}
"""

_INSERT_RESERVATION = f"""
INSERT INTO reservations (id, tenant_id, session_id, item_id, client_channel, client_value,
    reply_from, account_sid, quantity, status, message_sid, received_at, expires_at,
    created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14)
RETURNING {RESERVATION_COLUMNS}
"""

_WAITLIST_POSITION = """
SELECT count(*) FROM reservations
WHERE item_id = $1 AND status = 'waiting' AND (received_at, message_sid) <= ($2, $3)
"""

_WAITLIST_HEAD = f"""
SELECT {RESERVATION_COLUMNS} FROM reservations
WHERE item_id = $1 AND status = 'waiting'
ORDER BY received_at, message_sid
LIMIT 1
"""

_TAKE_UNITS_FOR_HEAD = f"""
UPDATE items SET held = held + $2, waiting = waiting - 1, updated_at = $3
WHERE id = $1 AND status = 'open' AND held + confirmed + $2 <= stock
RETURNING {ITEM_COLUMNS}
"""

_PROMOTE = f"""
UPDATE reservations SET status = 'held', expires_at = $2, updated_at = $3
WHERE id = $1 AND status = 'waiting'
RETURNING {RESERVATION_COLUMNS}
"""

LOCK_ITEM = f"SELECT {ITEM_COLUMNS} FROM items WHERE id = $1 AND tenant_id = $2 FOR UPDATE"

_RELEASE = f"""
UPDATE reservations SET status = 'released', release_reason = $2, expires_at = NULL,
    updated_at = $3
WHERE id = $1 AND status = ANY($4::text[])
RETURNING old.status AS previous, {_qualified("new", RESERVATION_COLUMNS)}
"""

_GIVE_BACK = f"""
UPDATE items SET held = held - $2, waiting = waiting - $3, updated_at = $4
WHERE id = $1
RETURNING {ITEM_COLUMNS}
"""

_LIVE_RESERVATION_OF = f"""
SELECT {RESERVATION_COLUMNS} FROM reservations
WHERE item_id = $1 AND client_channel = $2 AND client_value = $3 AND status <> 'released'
"""

ITEM_BY_CODE = (
    f"SELECT {ITEM_COLUMNS} FROM items WHERE tenant_id = $1 AND session_id = $2 AND code = $3"
)

CODE_IN_A_CLOSED_SESSION = """
SELECT 1 FROM items i JOIN sessions s ON s.id = i.session_id
WHERE i.tenant_id = $1 AND i.code = $2 AND s.status = 'closed'
LIMIT 1
"""

_DUE_ITEMS = """
SELECT i.id, i.tenant_id FROM items i
WHERE i.id IN (SELECT item_id FROM reservations WHERE status = 'held' AND expires_at <= $1)
ORDER BY i.id
LIMIT $2
FOR UPDATE OF i SKIP LOCKED
"""

_EXPIRE_DUE = f"""
UPDATE reservations SET status = 'released', release_reason = 'expired', expires_at = NULL,
    updated_at = $2
WHERE item_id = $1 AND status = 'held' AND expires_at <= $2
RETURNING {RESERVATION_COLUMNS}
"""

_INSERT_REPLY = """
INSERT INTO replies (tenant_id, idempotency_key, sender, recipient_channel, recipient_value,
    account_sid, body, content_sid, correlation_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT ON CONSTRAINT replies_key_unique DO NOTHING
"""


def item_from_row(row: asyncpg.Record | None) -> Item:
    # Callers pass the row their transaction just wrote or holds locked: it exists.
    assert row is not None, "item row missing inside its own transaction"
    return Item(
        id=row["id"],
        tenant_id=row["tenant_id"],
        session_id=row["session_id"],
        code=row["code"],
        title=row["title"],
        price_cents=row["price_cents"],
        currency=row["currency"],
        stock=row["stock"],
        held=row["held"],
        confirmed=row["confirmed"],
        waiting=row["waiting"],
        max_per_client=row["max_per_client"],
        status=ItemStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def reservation_from_row(row: asyncpg.Record, code: str, position: int = 0) -> Reservation:
    reason = row["release_reason"]
    return Reservation(
        id=row["id"],
        tenant_id=row["tenant_id"],
        session_id=row["session_id"],
        item_id=row["item_id"],
        item_code=code,
        client=Contact(Channel(row["client_channel"]), row["client_value"]),
        quantity=row["quantity"],
        status=ReservationStatus(row["status"]),
        release_reason=None if reason is None else ReleaseReason(reason),
        message_sid=row["message_sid"],
        received_at=row["received_at"],
        expires_at=row["expires_at"],
        updated_at=row["updated_at"],
        waitlist_position=position,
    )


def route_from_row(row: asyncpg.Record) -> ReplyRoute:
    return ReplyRoute(row["reply_from"], row["account_sid"])


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a claim did: `reply` names the reply text and carries its values."""

    reply: str
    values: dict[str, object]
    reservation: Reservation | None = None


@dataclass(slots=True)
class Released:
    reservation: Reservation
    promoted: list[Reservation] = field(default_factory=list)


async def queue_reply(
    conn: Connection,
    tenant_id: str,
    key: str,
    contact: Contact,
    route: ReplyRoute,
    body: str,
    correlation_id: str,
    content_sid: str | None = None,
) -> None:
    """A reply to send once this transaction commits; a second one with the same key is
    ignored (its cause was handled twice)."""
    await conn.execute(
        _INSERT_REPLY,
        tenant_id,
        key,
        route.sender,
        contact.channel.value,
        contact.value,
        route.account_sid,
        body,
        content_sid,
        correlation_id,
    )


class ReservationBook:
    """Claims, cancels, promotions and hold expiry; every method runs inside the caller's
    transaction (`conn`) so the inbound ledger, the RPCs and the sweeper share one code path."""

    def __init__(self, hold: timedelta) -> None:
        self.hold = hold

    @property
    def hold_minutes(self) -> int:
        return max(1, round(self.hold.total_seconds() / 60))

    async def claim(
        self,
        conn: Connection,
        item: Item,
        *,
        client: Contact,
        route: ReplyRoute,
        quantity: int,
        message_sid: str,
        received_at: datetime,
        now: datetime,
    ) -> Claimed:
        """A client's claim of `quantity` units (the caller checked the item is open and the
        per-client limit): held, waiting, or a reply saying why neither. The item row is
        locked by the claim UPDATE until the caller's transaction ends."""
        values: dict[str, object] = {
            "code": item.code,
            "title": item.title or item.code,
            "quantity": quantity,
        }
        existing = await conn.fetchrow(
            _LIVE_RESERVATION_OF, item.id, client.channel.value, client.value
        )
        if existing is not None:
            mine = reservation_from_row(existing, item.code)
            if mine.status is ReservationStatus.WAITING:
                position = await conn.fetchval(
                    _WAITLIST_POSITION, item.id, mine.received_at, mine.message_sid
                )
                return Claimed("already_waiting", {**values, "position": position}, mine)
            return Claimed("already_held", values, mine)
        if item.sold_for_good:
            return Claimed("sold_out", values)
        taken = await self.take(conn, item, quantity, received_at, message_sid, now)
        if taken is None:
            return Claimed("item_closed", values)
        granted, after = taken
        status = ReservationStatus.HELD if granted else ReservationStatus.WAITING
        inserted = await conn.fetchrow(
            _INSERT_RESERVATION,
            uuid.uuid4(),
            item.tenant_id,
            item.session_id,
            item.id,
            client.channel.value,
            client.value,
            route.sender,
            route.account_sid,
            quantity,
            status.value,
            message_sid,
            received_at,
            now + self.hold if granted else None,
            now,
        )
        assert inserted is not None
        if granted:
            reservation = reservation_from_row(inserted, item.code)
            await record_reservation_event(conn, events.RESERVATION_HELD, reservation, message_sid)
            if after.sold_out:
                await record_item_event(conn, events.ITEM_SOLD_OUT, after, message_sid)
            return Claimed("held", {**values, "hold_minutes": self.hold_minutes}, reservation)
        position = await conn.fetchval(_WAITLIST_POSITION, item.id, received_at, message_sid)
        reservation = reservation_from_row(inserted, item.code, position)
        await record_event(
            conn,
            subject=events.WAITLIST_JOINED,
            message=events.waitlist_joined(reservation, message_sid),
            aggregate_id=str(reservation.id),
            tenant_id=item.tenant_id,
        )
        return Claimed("waiting", {**values, "position": position}, reservation)

    async def take(
        self,
        conn: Connection,
        item: Item,
        quantity: int,
        received_at: datetime,
        message_sid: str,
        now: datetime,
    ) -> tuple[bool, Item] | None:
        """The claim's one conditional UPDATE: (units granted, the item after it), or None when
        the item is closed."""
        row = await conn.fetchrow(_CLAIM, item.id, quantity, received_at, message_sid, now)
        if row is None:
            return None
        granted: bool = row["granted"]
        return granted, item_from_row(row)

    async def take_in_order(
        self,
        conn: Connection,
        item: Item,
        claims: Sequence[tuple[int, datetime, str]],
        now: datetime,
    ) -> tuple[int, Item] | None:
        """`take` of each claim (quantity, received_at, message_sid), in that order (received_at,
        then MessageSid), in one conditional UPDATE: (how many of the first claims were granted,
        the item after them all; the others wait), or None when the item is closed."""
        row = await conn.fetchrow(
            _CLAIM_IN_ORDER,
            item.id,
            [quantity for quantity, _, _ in claims],
            [received_at for _, received_at, _ in claims],
            [message_sid for _, _, message_sid in claims],
            now,
        )
        if row is None:
            return None
        units, granted = row["units_granted"], 0
        while units > 0:
            units -= claims[granted][0]
            granted += 1
        assert units == 0, "the granted claims are not a prefix of the claims"
        return granted, item_from_row(row)

    async def promote(
        self, conn: Connection, item: Item, replies: Replies, now: datetime
    ) -> list[Reservation]:
        """Give free units to the head of the waitlist, in received_at order, while they fit.
        The caller holds the item row's lock."""
        promoted: list[Reservation] = []
        while True:
            head = await conn.fetchrow(_WAITLIST_HEAD, item.id)
            if head is None:
                break
            taken = await conn.fetchrow(_TAKE_UNITS_FOR_HEAD, item.id, head["quantity"], now)
            if taken is None:
                break
            row = await conn.fetchrow(_PROMOTE, head["id"], now + self.hold, now)
            assert row is not None  # a waiting row changes only under the item lock we hold
            reservation = reservation_from_row(row, item.code)
            promoted.append(reservation)
            await record_reservation_event(conn, events.RESERVATION_PROMOTED, reservation, "")
            await queue_reply(
                conn,
                item.tenant_id,
                f"live_catalog:promoted:{reservation.id}",
                reservation.client,
                route_from_row(row),
                replies.render("promoted", code=item.code, hold_minutes=self.hold_minutes),
                correlation_id=str(reservation.id),
            )
            if item_from_row(taken).sold_out:
                await record_item_event(conn, events.ITEM_SOLD_OUT, item_from_row(taken), "")
        return promoted

    async def release(
        self,
        conn: Connection,
        item: Item,
        reservation_id: uuid.UUID,
        reason: ReleaseReason,
        replies: Replies,
        now: datetime,
        correlation_id: str,
        *,
        from_statuses: Sequence[ReservationStatus] = (
            ReservationStatus.HELD,
            ReservationStatus.WAITING,
        ),
    ) -> Released | None:
        """Release a held or waiting reservation (None when it is in neither state any more)
        and promote the waitlist with the freed units. The caller holds the item row's lock."""
        row = await conn.fetchrow(
            _RELEASE, reservation_id, reason.value, now, [s.value for s in from_statuses]
        )
        if row is None:
            return None
        previous = ReservationStatus(row["previous"])
        freed = row["quantity"] if previous is ReservationStatus.HELD else 0
        left_waitlist = 1 if previous is ReservationStatus.WAITING else 0
        after = await conn.fetchrow(_GIVE_BACK, item.id, freed, left_waitlist, now)
        assert after is not None
        released = Released(reservation_from_row(row, item.code))
        await record_reservation_event(
            conn, events.RESERVATION_RELEASED, released.reservation, correlation_id
        )
        # Freed units serve the waitlist; so does a waiter leaving, when it was the head that
        # needed more units than were free.
        released.promoted = await self.promote(conn, item_from_row(after), replies, now)
        return released

    async def expire_due_holds(
        self,
        conn: Connection,
        replies_for: Callable[[str], Replies],
        now: datetime,
        batch: int,
    ) -> tuple[int, int]:
        """Release the lapsed holds of up to `batch` items (skipping items another transaction
        holds) and promote their waitlists; returns (holds released, reservations promoted)."""
        released = promoted = 0
        for due in await conn.fetch(_DUE_ITEMS, now, batch):
            replies = replies_for(due["tenant_id"])
            rows = await conn.fetch(_EXPIRE_DUE, due["id"], now)
            item_row = await conn.fetchrow(
                _GIVE_BACK, due["id"], sum(r["quantity"] for r in rows), 0, now
            )
            assert item_row is not None
            item = item_from_row(item_row)
            for row in rows:
                reservation = reservation_from_row(row, item.code)
                await record_reservation_event(conn, events.RESERVATION_RELEASED, reservation, "")
                await queue_reply(
                    conn,
                    item.tenant_id,
                    f"live_catalog:expired:{reservation.id}",
                    reservation.client,
                    route_from_row(row),
                    replies.render("expired", code=item.code),
                    correlation_id=str(reservation.id),
                )
            released += len(rows)
            promoted += len(await self.promote(conn, item, replies, now))
        return released, promoted


async def record_item_event(conn: Connection, subject: str, item: Item, correlation: str) -> None:
    await record_event(
        conn,
        subject=subject,
        message=events.item_changed(item, correlation),
        aggregate_id=str(item.id),
        tenant_id=item.tenant_id,
    )


async def record_reservation_event(
    conn: Connection, subject: str, reservation: Reservation, correlation: str
) -> None:
    await record_event(
        conn,
        subject=subject,
        message=events.reservation_changed(reservation, correlation),
        aggregate_id=str(reservation.id),
        tenant_id=reservation.tenant_id,
    )
