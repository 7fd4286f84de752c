"""The live catalog's use cases, each one PostgreSQL transaction (asyncpg, schema `live_catalog`):
the RPCs, the hold sweeper and the end-of-live summaries; inbound messages are `inbound.py`'s,
item changes `items.py`'s, and the reservation SQL, with why it is safe under concurrency,
`reservations.py`'s.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from infra.db import Connection
from infra.events import record_event
from infra.retention import Purge, batched_delete
from services.live_catalog import events
from services.live_catalog.domain import (
    AlreadyExistsError,
    BuyerLine,
    Channel,
    Contact,
    Inbound,
    Item,
    ItemTotals,
    NotFoundError,
    PreconditionError,
    ReleaseReason,
    Replies,
    ReplyRoute,
    Reservation,
    ReservationStatus,
    SessionTotals,
    SettingsBook,
    buyer_summary_lines,
    seller_summary_lines,
    within_whatsapp_window,
)
from services.live_catalog.inbound import CURRENT_SESSION, SESSION_BY_ID, InboundCatalog
from services.live_catalog.items import ItemBook
from services.live_catalog.reservations import (
    ITEM_COLUMNS,
    LOCK_ITEM,
    RESERVATION_COLUMNS,
    ReservationBook,
    item_from_row,
    queue_reply,
    record_reservation_event,
    reservation_from_row,
)

_GET_ITEM = f"SELECT {ITEM_COLUMNS} FROM items WHERE id = $1 AND tenant_id = $2"
_LIST_ITEMS = (
    f"SELECT {ITEM_COLUMNS} FROM items WHERE tenant_id = $1 AND session_id = $2 ORDER BY code"
)
_LIST_RESERVATIONS = f"""
SELECT * FROM (
    SELECT {", ".join("r." + c.strip() for c in RESERVATION_COLUMNS.split(","))}, i.code,
        CASE WHEN r.status = 'waiting' THEN row_number() OVER (
            PARTITION BY r.item_id, r.status ORDER BY r.received_at, r.message_sid) ELSE 0 END
            AS position
    FROM reservations r JOIN items i ON i.id = r.item_id
    WHERE r.tenant_id = $1 AND r.session_id = $2 AND ($3::uuid IS NULL OR r.item_id = $3)
) listed
WHERE $4::timestamptz IS NULL OR (received_at, id) > ($4, $5::uuid)
ORDER BY received_at, id
LIMIT $6
"""
_RESERVATION = f"""
SELECT {", ".join("r." + c.strip() for c in RESERVATION_COLUMNS.split(","))}, i.code
FROM reservations r JOIN items i ON i.id = r.item_id
WHERE r.id = $1 AND r.tenant_id = $2
"""
_CONFIRM = f"""
UPDATE reservations SET status = 'confirmed', expires_at = NULL, updated_at = $2
WHERE id = $1 AND status = 'held'
RETURNING {RESERVATION_COLUMNS}
"""
_MOVE_TO_CONFIRMED = "UPDATE items SET held = held - $2, confirmed = confirmed + $2 WHERE id = $1"
_CLOSE_SESSION = """
INSERT INTO sessions (id, tenant_id, status, opened_at, closed_at) VALUES ($1, $2, 'closed', $3, $4)
ON CONFLICT ON CONSTRAINT sessions_pkey
DO UPDATE SET status = 'closed', closed_at = COALESCE(sessions.closed_at, EXCLUDED.closed_at)
"""
_CLAIM_SUMMARY = """
UPDATE sessions SET summarized_at = $3 WHERE id = $1 AND tenant_id = $2 AND summarized_at IS NULL
RETURNING *
"""
_END_WAITLISTS = f"""
WITH locked AS MATERIALIZED (
    SELECT id FROM items WHERE session_id = $1 ORDER BY id FOR UPDATE
), cleared AS (
    UPDATE items SET waiting = 0 WHERE id IN (SELECT id FROM locked) AND waiting > 0
)
UPDATE reservations SET status = 'released', release_reason = 'session_ended', updated_at = $2
WHERE session_id = $1 AND status = 'waiting'
RETURNING {RESERVATION_COLUMNS}
"""
_TOTALS = """
SELECT i.id, i.code, i.title, i.stock, i.held, i.confirmed, i.waiting,
    COALESCE(r.released, 0) AS released
FROM items i LEFT JOIN (
    SELECT item_id, sum(quantity) AS released FROM reservations
    WHERE session_id = $2 AND status = 'released' AND release_reason IN ('cancelled', 'expired')
    GROUP BY item_id
) r ON r.item_id = i.id
WHERE i.tenant_id = $1 AND i.session_id = $2
ORDER BY i.code
"""
_BUYER_LINES = """
SELECT r.client_channel, r.client_value, r.reply_from, r.account_sid, r.quantity, r.status,
    r.received_at, i.code, i.title, i.price_cents, i.currency
FROM reservations r JOIN items i ON i.id = r.item_id
WHERE r.session_id = $1 AND r.status IN ('held', 'confirmed')
ORDER BY r.received_at
"""


# Retention of the ledger and of sent replies (`infra.retention.RetentionTask`); items,
# reservations and sessions are the sellers' records and are kept.
DELETE_OLD_LEDGER = batched_delete("processed_inbound", "message_sid", "processed_at")
DELETE_OLD_REPLIES = batched_delete("replies", "id", "enqueued_at")


def ledger_purges(max_age: timedelta | None) -> list[Purge]:
    """The ledger's and the sent replies' purges (none when kept forever). A reply's key must
    outlive any redelivery of its cause, as the ledger row does."""
    if max_age is None:
        return []
    return [
        Purge("processed_inbound", DELETE_OLD_LEDGER, max_age),
        Purge("replies", DELETE_OLD_REPLIES, max_age),
    ]


@dataclass(frozen=True, slots=True)
class Summarized:
    totals: SessionTotals
    buyer_summaries: int
    buyers_skipped: int
    seller_summary: bool


class CatalogStore:
    """Items, reservations and summaries of every tenant; "now" comes from `clock`; `book`
    replaces the reservation SQL (the benchmark's peer)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        clock: Callable[[], datetime],
        *,
        hold: timedelta,
        settings: SettingsBook,
        default_max_per_client: int,
        book: ReservationBook | None = None,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._settings = settings
        self._default_max = default_max_per_client
        self.book = book or ReservationBook(hold)
        self._items = ItemBook(self.book, self._replies)
        self.inbound = InboundCatalog(
            pool,
            clock,
            settings=settings,
            items=self._items,
            reservations=self.book,
            default_max_per_client=default_max_per_client,
        )

    async def handle_inbound(self, inbound: Inbound) -> str:
        """See `InboundCatalog.handle_inbound`."""
        return await self.inbound.handle_inbound(inbound)

    async def handle_batch(self, inbounds: Sequence[Inbound]) -> list[str | Exception]:
        """See `InboundCatalog.handle_batch`."""
        return await self.inbound.handle_batch(inbounds)

    def _replies(self, tenant_id: str) -> Replies:
        return self._settings.for_tenant(tenant_id).replies

    # --- RPCs -------------------------------------------------------------------------------

    async def current_session_id(self, tenant_id: str) -> uuid.UUID:
        row = await self._pool.fetchrow(CURRENT_SESSION, tenant_id)
        if row is None or row["status"] != "open":
            raise PreconditionError(f"tenant {tenant_id!r} has no live session in progress")
        session_id: uuid.UUID = row["id"]
        return session_id

    async def post_item(
        self,
        tenant_id: str,
        session_id: uuid.UUID | None,
        *,
        code: str,
        title: str,
        price_cents: int | None,
        currency: str,
        stock: int,
        max_per_client: int | None,
        correlation: str,
    ) -> Item:
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            session = (
                await conn.fetchrow(CURRENT_SESSION, tenant_id)
                if session_id is None
                else await conn.fetchrow(SESSION_BY_ID, session_id, tenant_id)
            )
            if session is None or session["status"] != "open":
                raise PreconditionError("no live session in progress to post the item in")
            try:
                return await self._items.insert(
                    conn,
                    tenant_id,
                    session["id"],
                    code=code,
                    title=title,
                    price_cents=price_cents,
                    currency=currency,
                    stock=stock,
                    max_per_client=max_per_client or self._default_max,
                    correlation=correlation,
                    now=now,
                )
            except asyncpg.UniqueViolationError:
                raise AlreadyExistsError(f"item {code} already exists in this session") from None

    async def update_item(
        self,
        tenant_id: str,
        item_id: uuid.UUID,
        *,
        title: str | None,
        price_cents: int | None,
        stock: int | None,
        max_per_client: int | None,
        correlation: str,
    ) -> tuple[Item, int]:
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            item = await self._lock_item(conn, tenant_id, item_id)
            return await self._items.edit(
                conn,
                item,
                title=item.title if title is None else title,
                price_cents=item.price_cents if price_cents is None else price_cents,
                stock=item.stock if stock is None else stock,
                max_per_client=item.max_per_client if max_per_client is None else max_per_client,
                correlation=correlation,
                now=now,
            )

    async def close_item(
        self, tenant_id: str, item_id: uuid.UUID, correlation: str
    ) -> tuple[Item, bool]:
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            item = await self._lock_item(conn, tenant_id, item_id)
            return await self._items.close(conn, item, correlation, now)

    async def get_item(self, tenant_id: str, item_id: uuid.UUID) -> Item:
        row = await self._pool.fetchrow(_GET_ITEM, item_id, tenant_id)
        if row is None:
            raise NotFoundError(f"tenant {tenant_id!r} has no item {item_id}")
        return item_from_row(row)

    async def list_items(self, tenant_id: str, session_id: uuid.UUID) -> list[Item]:
        return [
            item_from_row(r) for r in await self._pool.fetch(_LIST_ITEMS, tenant_id, session_id)
        ]

    async def list_reservations(
        self,
        tenant_id: str,
        session_id: uuid.UUID,
        item_id: uuid.UUID | None,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[Reservation]:
        """Claim order, `limit` rows after the (received_at, id) of the previous page."""
        rows = await self._pool.fetch(
            _LIST_RESERVATIONS,
            tenant_id,
            session_id,
            item_id,
            None if after is None else after[0],
            None if after is None else after[1],
            limit,
        )
        return [reservation_from_row(r, r["code"], r["position"]) for r in rows]

    async def cancel_reservation(
        self, tenant_id: str, reservation_id: uuid.UUID, correlation: str
    ) -> tuple[Reservation, int]:
        """Cancel by the seller; the client is told, and freed units go to the waitlist."""
        now = self._clock()
        replies = self._replies(tenant_id)
        async with self._pool.acquire() as conn, conn.transaction():
            found = await self._reservation(conn, tenant_id, reservation_id)
            item = await self._lock_item(conn, tenant_id, found.item_id)
            released = await self.book.release(
                conn, item, reservation_id, ReleaseReason.CANCELLED, replies, now, correlation
            )
            if released is None:
                current = await self._reservation(conn, tenant_id, reservation_id)
                raise PreconditionError(
                    f"reservation {reservation_id} is {current.status.value}, not held or waiting"
                )
            row = await conn.fetchrow(
                "SELECT reply_from, account_sid FROM reservations WHERE id = $1", reservation_id
            )
            assert row is not None, "reservation released in this transaction is gone"
            await queue_reply(
                conn,
                tenant_id,
                f"live_catalog:cancelled:{reservation_id}",
                released.reservation.client,
                ReplyRoute(row["reply_from"], row["account_sid"]),
                replies.render("cancelled", code=item.code),
                correlation or str(reservation_id),
            )
            return released.reservation, len(released.promoted)

    async def confirm_reservation(
        self, tenant_id: str, reservation_id: uuid.UUID, correlation: str
    ) -> Reservation:
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            found = await self._reservation(conn, tenant_id, reservation_id)
            await self._lock_item(conn, tenant_id, found.item_id)
            row = await conn.fetchrow(_CONFIRM, reservation_id, now)
            if row is None:
                current = await self._reservation(conn, tenant_id, reservation_id)
                raise PreconditionError(
                    f"reservation {reservation_id} is {current.status.value}, not held"
                )
            await conn.execute(_MOVE_TO_CONFIRMED, found.item_id, row["quantity"])
            confirmed = reservation_from_row(row, found.item_code)
            await record_reservation_event(
                conn, events.RESERVATION_CONFIRMED, confirmed, correlation
            )
            return confirmed

    async def _lock_item(self, conn: Connection, tenant_id: str, item_id: uuid.UUID) -> Item:
        row = await conn.fetchrow(LOCK_ITEM, item_id, tenant_id)
        if row is None:
            raise NotFoundError(f"tenant {tenant_id!r} has no item {item_id}")
        return item_from_row(row)

    async def _reservation(
        self, conn: Connection, tenant_id: str, reservation_id: uuid.UUID
    ) -> Reservation:
        row = await conn.fetchrow(_RESERVATION, reservation_id, tenant_id)
        if row is None:
            raise NotFoundError(f"tenant {tenant_id!r} has no reservation {reservation_id}")
        return reservation_from_row(row, row["code"])

    # --- hold sweeper -----------------------------------------------------------------------

    async def expire_holds(self, batch: int = 100) -> tuple[int, int]:
        """One transaction of the hold sweeper: (holds released, reservations promoted)."""
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            return await self.book.expire_due_holds(conn, self._replies, now, batch)

    # --- end of live ------------------------------------------------------------------------

    async def session_totals(self, tenant_id: str, session_id: uuid.UUID) -> SessionTotals:
        async with self._pool.acquire() as conn:
            session = await conn.fetchrow(SESSION_BY_ID, session_id, tenant_id)
            if session is None:
                raise NotFoundError(f"tenant {tenant_id!r} has no live session {session_id}")
            return await _totals(conn, tenant_id, session_id, session["summarized_at"])

    async def summarize_session(
        self,
        tenant_id: str,
        session_id: uuid.UUID,
        *,
        started_at: datetime,
        closed_at: datetime,
        content_sid: str,
        correlation: str,
    ) -> Summarized | None:
        """Mark the session closed, end its waitlists and queue one summary per buyer and one
        for the seller, once (None when it was already summarized). A buyer whose last
        message is older than WhatsApp's 24-hour window gets the `content_sid` template;
        without one configured, that buyer is skipped (and counted) rather than dead-lettered."""
        now = self._clock()
        replies = self._replies(tenant_id)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(_CLOSE_SESSION, session_id, tenant_id, started_at, closed_at)
            session = await conn.fetchrow(_CLAIM_SUMMARY, session_id, tenant_id, now)
            if session is None:
                return None
            for row in await conn.fetch(_END_WAITLISTS, session_id, now):
                await record_reservation_event(
                    conn, events.RESERVATION_RELEASED, reservation_from_row(row, ""), correlation
                )
            sent = skipped = 0
            for contact, route, last_at, lines in _buyers(
                await conn.fetch(_BUYER_LINES, session_id)
            ):
                body = replies.render("buyer_summary", lines=buyer_summary_lines(lines))
                template = None
                if contact.channel is Channel.WHATSAPP and not within_whatsapp_window(last_at, now):
                    if not content_sid:
                        skipped += 1
                        continue
                    template = content_sid
                # The client hashed: keys travel to logs and events, phone numbers must not.
                client = hashlib.sha256(f"{contact.channel}:{contact.value}".encode()).hexdigest()
                key = f"live_catalog:summary:{session_id}:{client[:24]}"
                await queue_reply(
                    conn, tenant_id, key, contact, route, body, correlation, content_sid=template
                )
                sent += 1
            totals = await _totals(conn, tenant_id, session_id, now)
            # A live without items (chat only) needs no summary for the seller.
            seller = session["seller_value"] is not None and bool(totals.items)
            if seller:
                await queue_reply(
                    conn,
                    tenant_id,
                    f"live_catalog:summary:{session_id}:seller",
                    Contact(Channel(session["seller_channel"]), session["seller_value"]),
                    ReplyRoute(session["seller_reply_from"], session["seller_account_sid"]),
                    replies.render("seller_summary", lines=seller_summary_lines(totals.items)),
                    correlation,
                )
            summarized = Summarized(totals, sent, skipped, seller)
            await record_event(
                conn,
                subject=events.SESSION_SUMMARIZED,
                message=events.session_summarized(summarized, self.book.hold),
                aggregate_id=str(session_id),
                tenant_id=tenant_id,
            )
            return summarized


async def _totals(
    conn: Connection, tenant_id: str, session_id: uuid.UUID, at: datetime | None
) -> SessionTotals:
    rows = await conn.fetch(_TOTALS, tenant_id, session_id)
    buyers = await conn.fetchval(
        "SELECT count(DISTINCT (client_channel, client_value)) FROM reservations"
        " WHERE session_id = $1 AND status IN ('held', 'confirmed')",
        session_id,
    )
    items = [
        ItemTotals(
            r["code"],
            r["title"],
            r["stock"],
            r["held"],
            r["confirmed"],
            r["released"],
            r["waiting"],
        )
        for r in rows
    ]
    return SessionTotals(tenant_id, session_id, items, buyers, at)


def _buyers(
    rows: Sequence[asyncpg.Record],
) -> list[tuple[Contact, ReplyRoute, datetime, list[BuyerLine]]]:
    """Reservation rows (oldest first) grouped by client, with the route and time of each
    client's latest claim."""
    grouped: dict[tuple[str, str], tuple[Contact, ReplyRoute, datetime, list[BuyerLine]]] = {}
    for row in rows:
        key = (row["client_channel"], row["client_value"])
        line = BuyerLine(
            row["code"],
            row["title"],
            row["quantity"],
            ReservationStatus(row["status"]),
            row["price_cents"],
            row["currency"],
        )
        lines = grouped[key][3] if key in grouped else []
        lines.append(line)
        grouped[key] = (
            Contact(Channel(key[0]), key[1]),
            ReplyRoute(row["reply_from"], row["account_sid"]),
            row["received_at"],
            lines,
        )
    return list(grouped.values())
