"""The live catalog's use cases, each one PostgreSQL transaction (asyncpg, schema `live_catalog`):
an inbound message (seller command or client claim/cancel, exactly once per MessageSid), the
RPCs, the hold sweeper and the end-of-live summaries. The reservation SQL itself, and why it is
safe under concurrency, is in `reservations.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from infra.events import record_event
from services.live_catalog import events
from services.live_catalog.domain import (
    AlreadyExistsError,
    BuyerLine,
    Cancel,
    Channel,
    Claim,
    CloseItem,
    Contact,
    Inbound,
    Item,
    ItemStatus,
    ItemTotals,
    NotFoundError,
    PostItem,
    PreconditionError,
    ReleaseReason,
    Replies,
    ReplyRoute,
    Reservation,
    ReservationStatus,
    SellerHelp,
    SessionTotals,
    SetStock,
    SettingsBook,
    buyer_summary_lines,
    format_price,
    seller_summary_lines,
    within_whatsapp_window,
)
from services.live_catalog.reservations import (
    CODE_IN_A_CLOSED_SESSION,
    ITEM_BY_CODE,
    ITEM_COLUMNS,
    LOCK_ITEM,
    RESERVATION_COLUMNS,
    ReservationBook,
    item_from_row,
    queue_reply,
    record_item_event,
    record_reservation_event,
    reservation_from_row,
)

_LEDGER = """
INSERT INTO processed_inbound (message_sid, tenant_id, outcome, processed_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT ON CONSTRAINT processed_inbound_pkey DO NOTHING
RETURNING true
"""
_OPEN_SESSION = """
INSERT INTO sessions (id, tenant_id, status, opened_at) VALUES ($1, $2, 'open', $3)
ON CONFLICT ON CONSTRAINT sessions_pkey DO NOTHING
"""
_SESSION = "SELECT * FROM sessions WHERE id = $1 AND tenant_id = $2"
# The open session opened last; else the last one (a message after the live ended).
_CURRENT_SESSION = """
SELECT * FROM sessions WHERE tenant_id = $1
ORDER BY status = 'open' DESC, opened_at DESC
LIMIT 1
"""
_NOTE_SELLER = """
UPDATE sessions SET seller_channel = $2, seller_value = $3, seller_reply_from = $4,
    seller_account_sid = $5, seller_last_at = GREATEST(seller_last_at, $6)
WHERE id = $1
"""
_INSERT_ITEM = f"""
INSERT INTO items (id, tenant_id, session_id, code, title, price_cents, currency, stock,
    max_per_client, status, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'open', $10, $10)
RETURNING {ITEM_COLUMNS}
"""
_EDIT_ITEM = f"""
UPDATE items SET title = $2, price_cents = $3, stock = $4, max_per_client = $5,
    status = 'open', updated_at = $6
WHERE id = $1 AND held + confirmed <= $4
RETURNING {ITEM_COLUMNS}
"""
_CLOSE_ITEM = f"""
UPDATE items SET status = 'closed', updated_at = $2 WHERE id = $1 AND status = 'open'
RETURNING {ITEM_COLUMNS}
"""
_WAITING_OF_ITEM = "SELECT id FROM reservations WHERE item_id = $1 AND status = 'waiting'"
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


@dataclass(frozen=True, slots=True)
class Summarized:
    totals: SessionTotals
    buyer_summaries: int
    buyers_skipped: int
    seller_summary: bool


class CatalogStore:
    """Items, reservations and summaries of every tenant; "now" comes from `clock`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        clock: Callable[[], datetime],
        *,
        hold: timedelta,
        settings: SettingsBook,
        default_max_per_client: int,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._settings = settings
        self._default_max = default_max_per_client
        self.book = ReservationBook(hold)

    def _replies(self, tenant_id: str) -> Replies:
        return self._settings.for_tenant(tenant_id).replies

    # --- inbound messages -------------------------------------------------------------------

    async def handle_inbound(self, inbound: Inbound) -> str:
        """Apply one routed message and queue its reply; returns the outcome (the reply's name,
        `ignored` for conversation, `duplicate` for a MessageSid already handled)."""
        grammar = self._settings.for_tenant(inbound.tenant_id).grammar
        command = (
            grammar.parse_seller(inbound.body)
            if inbound.from_seller
            else grammar.parse_client(inbound.body)
        )
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            if command is None:
                await self._session_of(conn, inbound, now)
                return "ignored"
            first = await conn.fetchval(
                _LEDGER, inbound.message_sid, inbound.tenant_id, type(command).__name__, now
            )
            if not first:
                return "duplicate"
            session = await self._session_of(conn, inbound, now)
            if isinstance(command, Claim | Cancel):
                name, values = await self._client_command(conn, inbound, command, session, now)
            else:
                name, values = await self._seller_command(conn, inbound, command, session, now)
            await queue_reply(
                conn,
                inbound.tenant_id,
                f"live_catalog:reply:{inbound.message_sid}",
                inbound.contact,
                inbound.route,
                self._replies(inbound.tenant_id).render(name, **values),
                inbound.message_sid,
            )
            return name

    async def _session_of(
        self, conn: asyncpg.Connection, inbound: Inbound, now: datetime
    ) -> asyncpg.Record | None:
        if inbound.session_id is not None:
            await conn.execute(_OPEN_SESSION, inbound.session_id, inbound.tenant_id, now)
            session = await conn.fetchrow(_SESSION, inbound.session_id, inbound.tenant_id)
        else:
            session = await conn.fetchrow(_CURRENT_SESSION, inbound.tenant_id)
        if session is not None and inbound.from_seller:
            await conn.execute(
                _NOTE_SELLER,
                session["id"],
                inbound.contact.channel.value,
                inbound.contact.value,
                inbound.route.sender,
                inbound.route.account_sid,
                inbound.received_at,
            )
        return session

    async def _client_command(
        self,
        conn: asyncpg.Connection,
        inbound: Inbound,
        command: Claim | Cancel,
        session: asyncpg.Record | None,
        now: datetime,
    ) -> tuple[str, dict[str, object]]:
        code = command.code
        row = None
        if session is not None:
            row = await conn.fetchrow(ITEM_BY_CODE, inbound.tenant_id, session["id"], code)
        if isinstance(command, Cancel):
            return await self._client_cancel(conn, inbound, row, code, now)
        if row is None:
            ended = await conn.fetchval(CODE_IN_A_CLOSED_SESSION, inbound.tenant_id, code)
            return ("session_ended" if ended else "unknown_code"), {"code": code}
        assert session is not None
        item = item_from_row(row)
        if session["status"] == "closed":
            return "session_ended", {"code": code}
        if item.status is ItemStatus.CLOSED:
            return "item_closed", {"code": code}
        if command.quantity > item.max_per_client:
            return "over_limit", {"code": code, "limit": item.max_per_client}
        claimed = await self.book.claim(
            conn,
            item,
            client=inbound.contact,
            route=inbound.route,
            quantity=command.quantity,
            message_sid=inbound.message_sid,
            received_at=inbound.received_at,
            now=now,
        )
        return claimed.reply, claimed.values

    async def _client_cancel(
        self,
        conn: asyncpg.Connection,
        inbound: Inbound,
        row: asyncpg.Record | None,
        code: str,
        now: datetime,
    ) -> tuple[str, dict[str, object]]:
        values: dict[str, object] = {"code": code}
        if row is None:
            return "nothing_to_cancel", values
        item = item_from_row(await conn.fetchrow(LOCK_ITEM, row["id"], inbound.tenant_id))
        mine = await conn.fetchrow(
            "SELECT id, status FROM reservations WHERE item_id = $1 AND client_channel = $2"
            " AND client_value = $3 AND status <> 'released'",
            item.id,
            inbound.contact.channel.value,
            inbound.contact.value,
        )
        if mine is None:
            return "nothing_to_cancel", values
        if mine["status"] == ReservationStatus.CONFIRMED.value:
            return "confirmed_cannot_cancel", values
        released = await self.book.release(
            conn,
            item,
            mine["id"],
            ReleaseReason.CANCELLED,
            self._replies(inbound.tenant_id),
            now,
            inbound.message_sid,
        )
        assert released is not None  # held or waiting, under the item lock
        return "cancelled", values

    async def _seller_command(
        self,
        conn: asyncpg.Connection,
        inbound: Inbound,
        command: PostItem | SetStock | CloseItem | SellerHelp,
        session: asyncpg.Record | None,
        now: datetime,
    ) -> tuple[str, dict[str, object]]:
        if isinstance(command, SellerHelp):
            return "seller_help", {}
        if session is None or session["status"] == "closed":
            return "seller_no_session", {}
        tenant_id, correlation = inbound.tenant_id, inbound.message_sid
        row = await conn.fetchrow(
            ITEM_BY_CODE + " FOR UPDATE", tenant_id, session["id"], command.code
        )
        if isinstance(command, PostItem):
            if row is None:
                item = await self._insert_item(
                    conn,
                    tenant_id,
                    session["id"],
                    code=command.code,
                    title=command.title,
                    price_cents=command.price_cents,
                    currency="EUR",
                    stock=command.stock,
                    max_per_client=command.max_per_client or self._default_max,
                    correlation=correlation,
                    now=now,
                )
                return "seller_posted", _item_values(item)
            existing = item_from_row(row)
            try:
                item, _ = await self._edit_item(
                    conn,
                    existing,
                    title=command.title or existing.title,
                    price_cents=command.price_cents
                    if command.price_cents is not None
                    else existing.price_cents,
                    stock=command.stock,
                    max_per_client=command.max_per_client or existing.max_per_client,
                    correlation=correlation,
                    now=now,
                )
            except PreconditionError:
                return "seller_stock_refused", _refusal(existing, command.stock)
            return "seller_updated", _item_values(item)
        if row is None:
            return "seller_unknown_code", {"code": command.code}
        existing = item_from_row(row)
        if isinstance(command, SetStock):
            try:
                item, _ = await self._edit_item(
                    conn,
                    existing,
                    title=existing.title,
                    price_cents=existing.price_cents,
                    stock=command.stock,
                    max_per_client=existing.max_per_client,
                    correlation=correlation,
                    now=now,
                )
            except PreconditionError:
                return "seller_stock_refused", _refusal(existing, command.stock)
            return "seller_stock", _item_values(item)
        await self._close_item(conn, existing, correlation, now)
        return "seller_closed", {"code": command.code}

    # --- shared item changes (messages and RPCs) --------------------------------------------

    async def _insert_item(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: uuid.UUID,
        *,
        code: str,
        title: str,
        price_cents: int | None,
        currency: str,
        stock: int,
        max_per_client: int,
        correlation: str,
        now: datetime,
    ) -> Item:
        row = await conn.fetchrow(
            _INSERT_ITEM,
            uuid.uuid4(),
            tenant_id,
            session_id,
            code,
            title,
            price_cents,
            currency,
            stock,
            max_per_client,
            now,
        )
        item = item_from_row(row)
        await record_item_event(conn, events.ITEM_POSTED, item, correlation)
        return item

    async def _edit_item(
        self,
        conn: asyncpg.Connection,
        item: Item,
        *,
        title: str,
        price_cents: int | None,
        stock: int,
        max_per_client: int,
        correlation: str,
        now: datetime,
    ) -> tuple[Item, int]:
        """Edit a locked item; PreconditionError when the stock is below the units taken.
        A larger stock serves the waitlist; returns the item and how many were promoted."""
        row = await conn.fetchrow(
            _EDIT_ITEM, item.id, title, price_cents, stock, max_per_client, now
        )
        if row is None:
            raise PreconditionError(
                f"stock {stock} is below the {item.held + item.confirmed} unit(s) of {item.code}"
                " already held or confirmed"
            )
        edited = item_from_row(row)
        await record_item_event(conn, events.ITEM_UPDATED, edited, correlation)
        promoted = await self.book.promote(conn, edited, self._replies(item.tenant_id), now)
        if promoted:
            edited = item_from_row(await conn.fetchrow(_GET_ITEM, item.id, item.tenant_id))
        elif edited.sold_out and not item.sold_out:
            await record_item_event(conn, events.ITEM_SOLD_OUT, edited, correlation)
        return edited, len(promoted)

    async def _close_item(
        self, conn: asyncpg.Connection, item: Item, correlation: str, now: datetime
    ) -> tuple[Item, bool]:
        """Close a locked item and release its waitlist (holds stay until confirmed or lapsed)."""
        row = await conn.fetchrow(_CLOSE_ITEM, item.id, now)
        if row is None:
            return item, False
        replies = self._replies(item.tenant_id)
        for waiting in await conn.fetch(_WAITING_OF_ITEM, item.id):
            await self.book.release(
                conn,
                item,
                waiting["id"],
                ReleaseReason.ITEM_CLOSED,
                replies,
                now,
                correlation,
                from_statuses=(ReservationStatus.WAITING,),
            )
        closed = item_from_row(await conn.fetchrow(_GET_ITEM, item.id, item.tenant_id))
        await record_item_event(conn, events.ITEM_CLOSED, closed, correlation)
        return closed, True

    # --- RPCs -------------------------------------------------------------------------------

    async def current_session_id(self, tenant_id: str) -> uuid.UUID:
        row = await self._pool.fetchrow(_CURRENT_SESSION, tenant_id)
        if row is None or row["status"] != "open":
            raise PreconditionError(f"tenant {tenant_id!r} has no live session in progress")
        return row["id"]

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
                await conn.fetchrow(_CURRENT_SESSION, tenant_id)
                if session_id is None
                else await conn.fetchrow(_SESSION, session_id, tenant_id)
            )
            if session is None or session["status"] != "open":
                raise PreconditionError("no live session in progress to post the item in")
            try:
                return await self._insert_item(
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
            return await self._edit_item(
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
            return await self._close_item(conn, item, correlation, now)

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

    async def _lock_item(
        self, conn: asyncpg.Connection, tenant_id: str, item_id: uuid.UUID
    ) -> Item:
        row = await conn.fetchrow(LOCK_ITEM, item_id, tenant_id)
        if row is None:
            raise NotFoundError(f"tenant {tenant_id!r} has no item {item_id}")
        return item_from_row(row)

    async def _reservation(
        self, conn: asyncpg.Connection, tenant_id: str, reservation_id: uuid.UUID
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
            session = await conn.fetchrow(_SESSION, session_id, tenant_id)
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
                key = f"live_catalog:summary:{session_id}:{contact.channel.value}:{contact.value}"
                await queue_reply(
                    conn, tenant_id, key, contact, route, body, correlation, content_sid=template
                )
                sent += 1
            totals = await _totals(conn, tenant_id, session_id, now)
            seller = session["seller_value"] is not None
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
    conn: asyncpg.Connection, tenant_id: str, session_id: uuid.UUID, at: datetime | None
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


def _item_values(item: Item) -> dict[str, object]:
    price = format_price(item.price_cents, item.currency) if item.price_cents is not None else ""
    return {"code": item.code, "title": item.title, "price": price, "stock": item.stock}


def _refusal(item: Item, stock: int) -> dict[str, object]:
    return {"code": item.code, "committed": item.held + item.confirmed, "stock": stock}
