"""A run of clients' claims inside a batch (consecutive in received_at order), applied
set-wise: the same outcomes, rows, events and replies as applying them one by one
(`InboundCatalog._apply`), in a few round trips for the whole run instead of about ten per
claim. The ledger, the sessions, the items and the clients' live reservations are read or
written once for all the claims; each item's claims are decided by one conditional UPDATE
(`ReservationBook.take_in_order`); reservations, waitlist places, events and replies are
written with one statement each.

A claim sees what the claims before it did: a second claim of a client on the same item gets
`already_held`/`already_waiting` (with the place it had at that moment), and a waiter's place
counts only the waiters received before it."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from infra.db import Connection
from infra.events import NewEvent, record_events
from services.live_catalog import events
from services.live_catalog.domain import (
    Claim,
    Inbound,
    Item,
    ItemStatus,
    Replies,
    ReservationStatus,
)
from services.live_catalog.reservations import (
    CODE_IN_A_CLOSED_SESSION,
    ITEM_COLUMNS,
    RESERVATION_COLUMNS,
    ReservationBook,
    item_from_row,
    reservation_from_row,
)

_LEDGER_MANY = """
INSERT INTO processed_inbound (message_sid, tenant_id, outcome, processed_at)
SELECT m.message_sid, m.tenant_id, 'Claim', $3
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS m(message_sid, tenant_id, n)
ORDER BY m.n
ON CONFLICT ON CONSTRAINT processed_inbound_pkey DO NOTHING
RETURNING message_sid
"""
_OPEN_SESSIONS = """
INSERT INTO sessions (id, tenant_id, status, opened_at)
SELECT s.id, s.tenant_id, 'open', $3
FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS s(id, tenant_id, n)
ORDER BY s.n
ON CONFLICT ON CONSTRAINT sessions_pkey DO NOTHING
"""
_SESSIONS = """
SELECT s.id, s.tenant_id, s.status FROM sessions s
JOIN unnest($1::uuid[], $2::text[]) AS w(id, tenant_id)
    ON s.id = w.id AND s.tenant_id = w.tenant_id
"""
_ITEMS_BY_CODE = f"""
SELECT {", ".join(f"i.{c.strip()}" for c in ITEM_COLUMNS.split(","))} FROM items i
JOIN unnest($1::text[], $2::uuid[], $3::text[]) AS w(tenant_id, session_id, code)
    ON i.tenant_id = w.tenant_id AND i.session_id = w.session_id AND i.code = w.code
"""
_LIVE_RESERVATIONS_OF = f"""
SELECT {", ".join(f"r.{c.strip()}" for c in RESERVATION_COLUMNS.split(","))} FROM reservations r
JOIN unnest($1::uuid[], $2::text[], $3::text[]) AS w(item_id, client_channel, client_value)
    ON r.item_id = w.item_id AND r.client_channel = w.client_channel
        AND r.client_value = w.client_value
WHERE r.status <> 'released'
"""
_INSERT_RESERVATIONS = f"""
INSERT INTO reservations (id, tenant_id, session_id, item_id, client_channel, client_value,
    reply_from, account_sid, quantity, status, message_sid, received_at, expires_at,
    created_at, updated_at)
SELECT r.id, r.tenant_id, r.session_id, r.item_id, r.client_channel, r.client_value,
    r.reply_from, r.account_sid, r.quantity, r.status, r.message_sid, r.received_at,
    r.expires_at, $14, $14
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::int[], $10::text[], $11::text[], $12::timestamptz[],
    $13::timestamptz[]) WITH ORDINALITY
    AS r(id, tenant_id, session_id, item_id, client_channel, client_value, reply_from,
        account_sid, quantity, status, message_sid, received_at, expires_at, n)
ORDER BY r.n
RETURNING {RESERVATION_COLUMNS}
"""
# Each reservation's place among its item's waiters (received_at, then MessageSid).
_WAITLIST_PLACES = """
SELECT w.message_sid, w.place FROM (
    SELECT message_sid, row_number() OVER (
        PARTITION BY item_id ORDER BY received_at, message_sid) AS place
    FROM reservations WHERE item_id = ANY($1::uuid[]) AND status = 'waiting'
) w
WHERE w.message_sid = ANY($2::text[])
"""
_INSERT_REPLIES = """
INSERT INTO replies (tenant_id, idempotency_key, sender, recipient_channel, recipient_value,
    account_sid, body, correlation_id)
SELECT r.tenant_id, r.idempotency_key, r.sender, r.recipient_channel, r.recipient_value,
    r.account_sid, r.body, r.correlation_id
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::text[]) WITH ORDINALITY
    AS r(tenant_id, idempotency_key, sender, recipient_channel, recipient_value, account_sid,
        body, correlation_id, n)
ORDER BY r.n
ON CONFLICT ON CONSTRAINT replies_key_unique DO NOTHING
"""

_Arrival = tuple[datetime, str]
_Client = tuple[uuid.UUID, str, str]  # item id, client channel, client value


@dataclass(slots=True)
class _Claiming:
    """One claim of the run on its way to a reply."""

    inbound: Inbound
    claim: Claim
    reply: str = ""
    values: dict[str, object] = field(default_factory=dict)
    item: Item | None = None
    # The live reservation the client already had (the database's or an earlier claim's).
    existing: asyncpg.Record | None = None
    earlier: _Claiming | None = None
    # Set for a claim that took part in its item's conditional UPDATE.
    granted: bool | None = None
    sold_out: Item | None = None
    row: asyncpg.Record | None = None

    @property
    def arrival(self) -> _Arrival:
        return self.inbound.received_at, self.inbound.message_sid

    @property
    def client(self) -> _Client:
        assert self.item is not None
        return self.item.id, self.inbound.contact.channel.value, self.inbound.contact.value

    def claim_values(self) -> dict[str, object]:
        assert self.item is not None
        return {
            "code": self.item.code,
            "title": self.item.title or self.item.code,
            "quantity": self.claim.quantity,
        }


async def apply_claims(
    conn: Connection,
    run: Sequence[tuple[Inbound, Claim]],
    now: datetime,
    *,
    book: ReservationBook,
    replies_for: Callable[[str], Replies],
) -> list[str]:
    """Apply a run of client claims (sorted by received_at, then MessageSid; each with a
    session id) in the caller's transaction; returns each claim's outcome, in order."""
    claims = [_Claiming(inbound, claim) for inbound, claim in run]
    fresh = await _first_deliveries(conn, claims, now)
    await _find_items(conn, fresh, now)
    takers = await _check_claims(conn, fresh)
    await _take(conn, takers, book, now)
    await _insert_reservations(conn, takers, book, now)
    _decide_replies(fresh, await _waitlist_places(conn, fresh), book.hold_minutes)
    await _record_events(conn, fresh)
    await _queue_replies(conn, fresh, replies_for)
    return [c.reply for c in claims]


async def _first_deliveries(
    conn: Connection, claims: list[_Claiming], now: datetime
) -> list[_Claiming]:
    """The claims whose MessageSid the ledger had not seen (the others are `duplicate`)."""
    firsts: dict[str, _Claiming] = {}
    for c in claims:
        firsts.setdefault(c.inbound.message_sid, c)
    rows = await conn.fetch(
        _LEDGER_MANY,
        list(firsts),
        [c.inbound.tenant_id for c in firsts.values()],
        now,
    )
    new = {row["message_sid"] for row in rows}
    fresh = []
    for c in claims:
        if firsts[c.inbound.message_sid] is c and c.inbound.message_sid in new:
            fresh.append(c)
        else:
            c.reply = "duplicate"
    return fresh


async def _find_items(conn: Connection, claims: list[_Claiming], now: datetime) -> None:
    """Each claim's session (opened when first seen) and item, read once per distinct one;
    a claim with no item or session gets its reply here."""
    pairs = list(dict.fromkeys((c.inbound.session_id, c.inbound.tenant_id) for c in claims))
    if not pairs:
        return
    sessions_ids = [session_id for session_id, _ in pairs]
    tenants = [tenant for _, tenant in pairs]
    await conn.execute(_OPEN_SESSIONS, sessions_ids, tenants, now)
    closed = {
        (row["id"], row["tenant_id"]): row["status"] == "closed"
        for row in await conn.fetch(_SESSIONS, sessions_ids, tenants)
    }
    wanted = list(
        dict.fromkeys(
            (c.inbound.tenant_id, c.inbound.session_id, c.claim.code)
            for c in claims
            if (c.inbound.session_id, c.inbound.tenant_id) in closed
        )
    )
    items = {
        (row["tenant_id"], row["session_id"], row["code"]): item_from_row(row)
        for row in await conn.fetch(
            _ITEMS_BY_CODE,
            [tenant for tenant, _, _ in wanted],
            [session for _, session, _ in wanted],
            [code for _, _, code in wanted],
        )
    }
    ended_codes: dict[tuple[str, str], bool] = {}
    for c in claims:
        tenant, code = c.inbound.tenant_id, c.claim.code
        item = items.get((tenant, c.inbound.session_id, code))
        if item is None:
            if (tenant, code) not in ended_codes:
                ended = await conn.fetchval(CODE_IN_A_CLOSED_SESSION, tenant, code)
                ended_codes[tenant, code] = bool(ended)
            c.reply = "session_ended" if ended_codes[tenant, code] else "unknown_code"
            c.values = {"code": code}
        elif closed[c.inbound.session_id, tenant]:
            c.reply, c.values = "session_ended", {"code": code}
        else:
            c.item = item


async def _check_claims(conn: Connection, claims: list[_Claiming]) -> list[_Claiming]:
    """The checks a claim passes before its conditional UPDATE, in `InboundCatalog`'s and
    `ReservationBook.claim`'s order; returns the claims that go on to take units."""
    candidates = []
    for c in claims:
        if c.reply or c.item is None:
            continue
        if c.item.status is ItemStatus.CLOSED:
            c.reply, c.values = "item_closed", {"code": c.claim.code}
        elif c.claim.quantity > c.item.max_per_client:
            c.reply = "over_limit"
            c.values = {"code": c.claim.code, "limit": c.item.max_per_client}
        else:
            candidates.append(c)
    if not candidates:
        return []
    clients = list(dict.fromkeys(c.client for c in candidates))
    existing = {
        (row["item_id"], row["client_channel"], row["client_value"]): row
        for row in await conn.fetch(
            _LIVE_RESERVATIONS_OF,
            [item_id for item_id, _, _ in clients],
            [channel for _, channel, _ in clients],
            [value for _, _, value in clients],
        )
    }
    takers: list[_Claiming] = []
    taking: dict[_Client, _Claiming] = {}
    for c in candidates:
        assert c.item is not None
        if c.client in existing:
            c.existing = existing[c.client]
        elif c.client in taking:
            c.earlier = taking[c.client]
        elif c.item.sold_for_good:
            c.reply, c.values = "sold_out", c.claim_values()
        else:
            taking[c.client] = c
            takers.append(c)
    return takers


async def _take(
    conn: Connection, takers: list[_Claiming], book: ReservationBook, now: datetime
) -> None:
    """Each item's claims decided by its one conditional UPDATE, items in the order of their
    first claim (the order the claims one by one would have locked them)."""
    by_item: dict[uuid.UUID, list[_Claiming]] = {}
    for c in takers:
        assert c.item is not None
        by_item.setdefault(c.item.id, []).append(c)
    for group in by_item.values():
        item = group[0].item
        assert item is not None
        taken = await book.take_in_order(
            conn,
            item,
            [(c.claim.quantity, c.inbound.received_at, c.inbound.message_sid) for c in group],
            now,
        )
        if taken is None:
            for c in group:
                c.reply, c.values = "item_closed", c.claim_values()
            continue
        granted, after = taken
        for n, c in enumerate(group):
            c.granted = n < granted
        if granted:
            # The item as the last granted claim left it: the later claims only wait.
            last = dataclasses.replace(after, waiting=after.waiting - (len(group) - granted))
            if last.sold_out:
                group[granted - 1].sold_out = last


async def _insert_reservations(
    conn: Connection, takers: list[_Claiming], book: ReservationBook, now: datetime
) -> None:
    made = [c for c in takers if c.granted is not None]
    if not made:
        return
    items: list[Item] = []
    for c in made:
        assert c.item is not None
        items.append(c.item)
    rows = await conn.fetch(
        _INSERT_RESERVATIONS,
        [uuid.uuid4() for _ in made],
        [item.tenant_id for item in items],
        [item.session_id for item in items],
        [item.id for item in items],
        [c.inbound.contact.channel.value for c in made],
        [c.inbound.contact.value for c in made],
        [c.inbound.route.sender for c in made],
        [c.inbound.route.account_sid for c in made],
        [c.claim.quantity for c in made],
        [(ReservationStatus.HELD if c.granted else ReservationStatus.WAITING).value for c in made],
        [c.inbound.message_sid for c in made],
        [c.inbound.received_at for c in made],
        [now + book.hold if c.granted else None for c in made],
        now,
    )
    by_sid = {row["message_sid"]: row for row in rows}
    for c in made:
        c.row = by_sid[c.inbound.message_sid]


def _waited_on(c: _Claiming) -> tuple[uuid.UUID, _Arrival] | None:
    """The waiting reservation whose place `c`'s reply gives (its item and arrival)."""
    assert c.item is not None
    if c.granted is False:
        return c.item.id, c.arrival
    if c.existing is not None and c.existing["status"] == ReservationStatus.WAITING.value:
        return c.item.id, (c.existing["received_at"], c.existing["message_sid"])
    if c.earlier is not None and c.earlier.granted is False:
        return c.item.id, c.earlier.arrival
    return None


async def _waitlist_places(conn: Connection, claims: list[_Claiming]) -> dict[str, int]:
    """The place each claim's reply gives, by MessageSid: the waiters received up to the
    waiting reservation it names, among those waiting when the claim was applied."""
    named = {}
    for c in claims:
        waited_on = _waited_on(c) if c.item is not None else None
        if waited_on is not None:
            named[c.inbound.message_sid] = waited_on
    if not named:
        return {}
    rows = await conn.fetch(
        _WAITLIST_PLACES,
        list({item_id for item_id, _ in named.values()}),
        list({sid for _, (_, sid) in named.values()}),
    )
    now_at = {row["message_sid"]: row["place"] for row in rows}
    # The run's new waiters, per item: those received after a claim had not joined yet.
    joined: dict[uuid.UUID, list[_Arrival]] = {}
    for c in claims:
        if c.granted is False:
            assert c.item is not None
            joined.setdefault(c.item.id, []).append(c.arrival)
    places = {}
    for c in claims:
        sid = c.inbound.message_sid
        if sid not in named:
            continue
        item_id, waiter = named[sid]
        later = sum(1 for a in joined.get(item_id, ()) if c.arrival < a <= waiter)
        places[sid] = now_at[waiter[1]] - later
    return places


def _decide_replies(claims: list[_Claiming], places: dict[str, int], hold_minutes: int) -> None:
    for c in claims:
        if c.reply:
            continue
        place = places.get(c.inbound.message_sid)
        values = c.claim_values()
        if c.granted is True:
            c.reply, c.values = "held", {**values, "hold_minutes": hold_minutes}
        elif c.granted is False:
            c.reply, c.values = "waiting", {**values, "position": place}
        elif c.existing is not None or (c.earlier is not None and c.earlier.granted is not None):
            if place is None:
                c.reply, c.values = "already_held", values
            else:
                c.reply, c.values = "already_waiting", {**values, "position": place}
        else:  # the earlier claim found the item closed, so does this one
            assert c.earlier is not None and c.earlier.reply == "item_closed"
            c.reply, c.values = "item_closed", {"code": c.claim.code}


async def _record_events(conn: Connection, claims: list[_Claiming]) -> None:
    """The events of the claims one by one, in their order."""
    new: list[NewEvent] = []
    for c in claims:
        if c.row is None:
            continue
        assert c.item is not None
        sid = c.inbound.message_sid
        if c.granted:
            reservation = reservation_from_row(c.row, c.item.code)
            new.append(
                NewEvent(
                    events.RESERVATION_HELD,
                    events.reservation_changed(reservation, sid),
                    str(reservation.id),
                    reservation.tenant_id,
                )
            )
            if c.sold_out is not None:
                new.append(
                    NewEvent(
                        events.ITEM_SOLD_OUT,
                        events.item_changed(c.sold_out, sid),
                        str(c.sold_out.id),
                        c.sold_out.tenant_id,
                    )
                )
        else:
            position = c.values["position"]
            assert isinstance(position, int)
            reservation = reservation_from_row(c.row, c.item.code, position)
            new.append(
                NewEvent(
                    events.WAITLIST_JOINED,
                    events.waitlist_joined(reservation, sid),
                    str(reservation.id),
                    c.item.tenant_id,
                )
            )
    await record_events(conn, new)


async def _queue_replies(
    conn: Connection, claims: list[_Claiming], replies_for: Callable[[str], Replies]
) -> None:
    """Each claim's reply, as `queue_reply` would queue it."""
    if not claims:
        return
    await conn.execute(
        _INSERT_REPLIES,
        [c.inbound.tenant_id for c in claims],
        [f"live_catalog:reply:{c.inbound.message_sid}" for c in claims],
        [c.inbound.route.sender for c in claims],
        [c.inbound.contact.channel.value for c in claims],
        [c.inbound.contact.value for c in claims],
        [c.inbound.route.account_sid for c in claims],
        [replies_for(c.inbound.tenant_id).render(c.reply, **c.values) for c in claims],
        [c.inbound.message_sid for c in claims],
    )
