"""Posting, editing and closing items inside the caller's transaction: one code path for seller
messages and the RPCs. Edits and closes expect the item row locked by the caller."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

from infra.db import Connection
from services.live_catalog import events
from services.live_catalog.domain import (
    Item,
    PreconditionError,
    ReleaseReason,
    Replies,
    ReservationStatus,
)
from services.live_catalog.reservations import (
    ITEM_COLUMNS,
    ReservationBook,
    item_from_row,
    record_item_event,
)

_INSERT_ITEM = f"""
INSERT INTO items (id, tenant_id, session_id, code, title, price_cents, currency, stock,
    max_per_client, status, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'open', $10, $10)
RETURNING {ITEM_COLUMNS}
"""
_EDIT_ITEM = f"""
UPDATE items SET title = $2, price_cents = $3, stock = $4, max_per_client = $5,
    status = CASE WHEN $7 THEN 'open' ELSE status END, updated_at = $6
WHERE id = $1 AND held + confirmed <= $4
RETURNING {ITEM_COLUMNS}
"""
_CLOSE_ITEM = f"""
UPDATE items SET status = 'closed', updated_at = $2 WHERE id = $1 AND status = 'open'
RETURNING {ITEM_COLUMNS}
"""
_WAITING_OF_ITEM = "SELECT id FROM reservations WHERE item_id = $1 AND status = 'waiting'"
_GET_ITEM = f"SELECT {ITEM_COLUMNS} FROM items WHERE id = $1"


class ItemBook:
    def __init__(
        self, reservations: ReservationBook, replies_for: Callable[[str], Replies]
    ) -> None:
        self._reservations = reservations
        self._replies = replies_for

    async def insert(
        self,
        conn: Connection,
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

    async def edit(
        self,
        conn: Connection,
        item: Item,
        *,
        title: str,
        price_cents: int | None,
        stock: int,
        max_per_client: int,
        correlation: str,
        now: datetime,
        reopen: bool = False,
    ) -> tuple[Item, int]:
        """Edit a locked item (and open it again if closed, when `reopen`: a seller posting
        the code anew); PreconditionError when the stock is below the units taken. A larger
        stock serves the waitlist; returns the item and how many were promoted."""
        row = await conn.fetchrow(
            _EDIT_ITEM, item.id, title, price_cents, stock, max_per_client, now, reopen
        )
        if row is None:
            raise PreconditionError(
                f"stock {stock} is below the {item.held + item.confirmed} unit(s) of {item.code}"
                " already held or confirmed"
            )
        edited = item_from_row(row)
        await record_item_event(conn, events.ITEM_UPDATED, edited, correlation)
        promoted = await self._reservations.promote(
            conn, edited, self._replies(item.tenant_id), now
        )
        if promoted:
            edited = item_from_row(await conn.fetchrow(_GET_ITEM, item.id))
        elif edited.sold_out and not item.sold_out:
            await record_item_event(conn, events.ITEM_SOLD_OUT, edited, correlation)
        return edited, len(promoted)

    async def close(
        self, conn: Connection, item: Item, correlation: str, now: datetime
    ) -> tuple[Item, bool]:
        """Close a locked item and release its waitlist (holds stay until confirmed or lapsed)."""
        row = await conn.fetchrow(_CLOSE_ITEM, item.id, now)
        if row is None:
            return item, False
        replies = self._replies(item.tenant_id)
        for waiting in await conn.fetch(_WAITING_OF_ITEM, item.id):
            await self._reservations.release(
                conn,
                item,
                waiting["id"],
                ReleaseReason.ITEM_CLOSED,
                replies,
                now,
                correlation,
                from_statuses=(ReservationStatus.WAITING,),
            )
        closed = item_from_row(await conn.fetchrow(_GET_ITEM, item.id))
        await record_item_event(conn, events.ITEM_CLOSED, closed, correlation)
        return closed, True
