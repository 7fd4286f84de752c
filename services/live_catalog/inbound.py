"""The catalog's side of an inbound message, in one transaction: a seller's command or a
client's claim or cancel, applied exactly once per MessageSid (the `processed_inbound` ledger
row is written first, so a redelivery, even a concurrent one, waits and then finds it), with
its reply queued in the same transaction. Messages that are neither are conversation and only
keep the catalog's view of the current session up to date."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime

import asyncpg

from infra.db import Connection
from infra.log import get_logger
from services.live_catalog.claim_runs import apply_claims
from services.live_catalog.domain import (
    Cancel,
    Claim,
    ClientCommand,
    CloseItem,
    Inbound,
    Item,
    ItemStatus,
    PostItem,
    PreconditionError,
    ReleaseReason,
    Replies,
    ReservationStatus,
    SellerCommand,
    SellerHelp,
    SetStock,
    SettingsBook,
    format_price,
)
from services.live_catalog.items import ItemBook
from services.live_catalog.reservations import (
    CODE_IN_A_CLOSED_SESSION,
    ITEM_BY_CODE,
    LOCK_ITEM,
    ReservationBook,
    item_from_row,
    queue_reply,
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
SESSION_BY_ID = "SELECT * FROM sessions WHERE id = $1 AND tenant_id = $2"
# The open session opened last; else the last one (a message after the live ended).
CURRENT_SESSION = """
SELECT * FROM sessions WHERE tenant_id = $1
ORDER BY status = 'open' DESC, opened_at DESC
LIMIT 1
"""
_NOTE_SELLER = """
UPDATE sessions SET seller_channel = $2, seller_value = $3, seller_reply_from = $4,
    seller_account_sid = $5, seller_last_at = GREATEST(seller_last_at, $6)
WHERE id = $1
"""


_log = get_logger(__name__)


def _arrival(inbound: Inbound) -> tuple[datetime, str]:
    return inbound.received_at, inbound.message_sid


def _runs(
    inbounds: Sequence[Inbound],
    commands: Sequence[SellerCommand | ClientCommand | None],
    order: Sequence[int],
) -> Iterator[int | list[tuple[int, Claim]]]:
    """The batch in `order`: each run of consecutive clients' claims in a live session (a list,
    applied together by `apply_claims`), every other message on its own (its index)."""
    run: list[tuple[int, Claim]] = []
    for i in order:
        command = commands[i]  # only a client's message is a Claim
        if isinstance(command, Claim) and inbounds[i].session_id is not None:
            run.append((i, command))
            continue
        if run:
            yield run
            run = []
        yield i
    if run:
        yield run


class InboundCatalog:
    def __init__(
        self,
        pool: asyncpg.Pool,
        clock: Callable[[], datetime],
        *,
        settings: SettingsBook,
        items: ItemBook,
        reservations: ReservationBook,
        default_max_per_client: int,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._settings = settings
        self._items = items
        self._reservations = reservations
        self._default_max = default_max_per_client

    def _replies(self, tenant_id: str) -> Replies:
        return self._settings.for_tenant(tenant_id).replies

    async def handle_inbound(self, inbound: Inbound) -> str:
        """Apply one routed message and queue its reply; returns the outcome (the reply's name,
        `ignored` for conversation, `duplicate` for a MessageSid already handled)."""
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            return await self._apply(conn, inbound, self._command(inbound), now)

    async def handle_batch(self, inbounds: Sequence[Inbound]) -> list[str | Exception]:
        """The routed messages in flight together, in one transaction and in the order the
        gateway received them (received_at, then MessageSid): claims on one item are decided
        first come, first served whatever order they were delivered in, and the item row is
        locked and committed once per batch instead of once per claim. Each run of clients'
        claims (consecutive in that order) is applied set-wise by `apply_claims`, with the
        outcomes, rows, events and replies they would have had one by one. Each message's outcome
        as `handle_inbound`'s, or the exception it raised: when the batch's transaction fails
        (a concurrent claim of the same client, a deadlock, the database gone), each message
        is handled again on its own, in the same order, so an error is only its own."""
        order = sorted(range(len(inbounds)), key=lambda i: _arrival(inbounds[i]))
        outcomes: list[str | Exception] = [""] * len(inbounds)
        # Each message parsed once, for finding the runs of claims and for applying it.
        commands = [self._command(inbound) for inbound in inbounds]
        now = self._clock()
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                for run in _runs(inbounds, commands, order):
                    if isinstance(run, int):
                        outcomes[run] = await self._apply(conn, inbounds[run], commands[run], now)
                        continue
                    claimed = await apply_claims(
                        conn,
                        [(inbounds[i], claim) for i, claim in run],
                        now,
                        book=self._reservations,
                        replies_for=self._replies,
                    )
                    for (i, _), outcome in zip(run, claimed, strict=True):
                        outcomes[i] = outcome
            return outcomes
        except Exception as error:
            if len(inbounds) == 1:
                raise
            _log.warning(
                "live_catalog.batch_failed",
                extra={"fields": {"messages": len(inbounds), "error": str(error) or repr(error)}},
            )
        for i in order:
            try:
                outcomes[i] = await self.handle_inbound(inbounds[i])
            except Exception as error:
                outcomes[i] = error
        return outcomes

    def _command(self, inbound: Inbound) -> SellerCommand | ClientCommand | None:
        """What the message asks, in its tenant's grammar: a seller's command or a client's."""
        grammar = self._settings.for_tenant(inbound.tenant_id).grammar
        if inbound.from_seller:
            return grammar.parse_seller(inbound.body)
        return grammar.parse_client(inbound.body)

    async def _apply(
        self,
        conn: Connection,
        inbound: Inbound,
        command: SellerCommand | ClientCommand | None,
        now: datetime,
    ) -> str:
        """Apply one message whose `command` is `_command(inbound)`."""
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
        self, conn: Connection, inbound: Inbound, now: datetime
    ) -> asyncpg.Record | None:
        if inbound.session_id is not None:
            await conn.execute(_OPEN_SESSION, inbound.session_id, inbound.tenant_id, now)
            session = await conn.fetchrow(SESSION_BY_ID, inbound.session_id, inbound.tenant_id)
        else:
            session = await conn.fetchrow(CURRENT_SESSION, inbound.tenant_id)
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
        conn: Connection,
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
        claimed = await self._reservations.claim(
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
        conn: Connection,
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
        released = await self._reservations.release(
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
        conn: Connection,
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
                item = await self._items.insert(
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
                item, _ = await self._items.edit(
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
                    reopen=True,
                )
            except PreconditionError:
                return "seller_stock_refused", _refusal(existing, command.stock)
            return "seller_updated", _item_values(item)
        if row is None:
            return "seller_unknown_code", {"code": command.code}
        existing = item_from_row(row)
        if isinstance(command, SetStock):
            try:
                item, _ = await self._items.edit(
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
        await self._items.close(conn, existing, correlation, now)
        return "seller_closed", {"code": command.code}


def _item_values(item: Item) -> dict[str, object]:
    """`details` is the title and the price, whichever were given: `Robe 25 €`."""
    price = format_price(item.price_cents, item.currency) if item.price_cents is not None else ""
    details = " ".join(part for part in (item.title, price) if part)
    return {"code": item.code, "details": details, "stock": item.stock}


def _refusal(item: Item, stock: int) -> dict[str, object]:
    return {"code": item.code, "committed": item.held + item.confirmed, "stock": stock}
