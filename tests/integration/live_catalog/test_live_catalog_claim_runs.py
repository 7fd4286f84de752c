"""A batch's claims applied together end exactly as the same messages applied one by one in
received_at order: the same outcomes, item counters, reservation rows, events and replies."""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from google.protobuf.json_format import MessageToDict
from snapsell.live_catalog.v1 import events_pb2

from services.live_catalog import events
from services.live_catalog.domain import Grammar, Inbound
from services.live_catalog.store import CatalogStore
from tests.integration.live_catalog.conftest import ManualClock, inbound

pytestmark = pytest.mark.usefixtures("clean_tables")

_PAYLOADS = {
    events.ITEM_POSTED: events_pb2.ItemChanged,
    events.ITEM_UPDATED: events_pb2.ItemChanged,
    events.ITEM_SOLD_OUT: events_pb2.ItemChanged,
    events.ITEM_CLOSED: events_pb2.ItemChanged,
    events.RESERVATION_HELD: events_pb2.ReservationChanged,
    events.RESERVATION_CONFIRMED: events_pb2.ReservationChanged,
    events.RESERVATION_RELEASED: events_pb2.ReservationChanged,
    events.RESERVATION_PROMOTED: events_pb2.ReservationChanged,
    events.WAITLIST_JOINED: events_pb2.WaitlistJoined,
    events.SESSION_SUMMARIZED: events_pb2.SessionSummarized,
}
# Generated per run (uuid4), so left out of the comparison.
_RANDOM_IDS = {"itemId", "reservationId"}


@dataclass
class Live:
    """A shop's live: what happened before the batch, then the batch itself."""

    clock: ManualClock
    tenant: str = field(default_factory=lambda: f"shop-{uuid.uuid4().hex[:8]}")
    session: uuid.UUID = field(default_factory=uuid.uuid4)
    before: list[Inbound] = field(default_factory=list)
    confirm: list[str] = field(default_factory=list)  # MessageSids of holds to confirm
    ended: list[uuid.UUID] = field(default_factory=list)  # sessions closed before the batch
    batch: list[Inbound] = field(default_factory=list)

    def at(self, ms: int) -> datetime:
        return self.clock.now + timedelta(milliseconds=ms)

    def seller(self, body: str, ms: int, *, sid: str | None = None) -> Inbound:
        return inbound(
            body, tenant=self.tenant, session=self.session, seller=True, at=self.at(ms), sid=sid
        )

    def client(
        self,
        who: int,
        body: str,
        ms: int,
        *,
        sid: str | None = None,
        session: uuid.UUID | None = None,
    ) -> Inbound:
        return inbound(
            body,
            tenant=self.tenant,
            session=session or self.session,
            sender=f"+3361000{who:04d}",
            at=self.at(ms),
            sid=sid,
        )


def _without_random_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_random_ids(v) for k, v in value.items() if k not in _RANDOM_IDS}
    if isinstance(value, list):
        return [_without_random_ids(v) for v in value]
    return value


async def _what_happened(pool: asyncpg.Pool, outcomes: list[object]) -> dict[str, object]:
    items = await pool.fetch(
        "SELECT code, stock, held, confirmed, waiting, status, updated_at FROM items ORDER BY code"
    )
    reservations = await pool.fetch(
        "SELECT i.code, r.client_value, r.quantity, r.status, r.release_reason, r.message_sid,"
        " r.received_at, r.expires_at, r.updated_at, r.reply_from, r.account_sid"
        " FROM reservations r JOIN items i ON i.id = r.item_id ORDER BY r.message_sid"
    )
    replies = await pool.fetch(
        "SELECT idempotency_key, sender, recipient_channel, recipient_value, account_sid, body,"
        " content_sid, correlation_id FROM replies ORDER BY id"
    )
    # A promotion's reply is keyed by its reservation's id: named by its MessageSid instead.
    sid_of = {
        str(row["id"]): f"reservation of {row['message_sid']}"
        for row in await pool.fetch("SELECT id, message_sid FROM reservations")
    }

    def named(text: str) -> str:
        for reservation_id, name in sid_of.items():
            text = text.replace(reservation_id, name)
        return text

    recorded = await pool.fetch("SELECT subject, tenant_id, payload FROM events ORDER BY id")
    ledger = await pool.fetch("SELECT message_sid, outcome FROM processed_inbound ORDER BY 1")
    return {
        "outcomes": outcomes,
        "items": [dict(row) for row in items],
        "reservations": [dict(row) for row in reservations],
        "replies": [
            {
                **row,
                "idempotency_key": named(row["idempotency_key"]),
                "correlation_id": named(row["correlation_id"]),
            }
            for row in replies
        ],
        "events": [
            (
                row["subject"],
                row["tenant_id"],
                _without_random_ids(
                    MessageToDict(_PAYLOADS[row["subject"]].FromString(row["payload"]))
                ),
            )
            for row in recorded
        ],
        "ledger": [dict(row) for row in ledger],
    }


async def _play(
    store: CatalogStore,
    pool: asyncpg.Pool,
    live: Live,
    *,
    together: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, object]:
    await pool.execute("TRUNCATE reservations, items, sessions, processed_inbound, replies, events")
    for message in live.before:
        await store.handle_inbound(message)
    for sid in live.confirm:
        held = await pool.fetchval("SELECT id FROM reservations WHERE message_sid = $1", sid)
        await store.confirm_reservation(live.tenant, held, "")
    for session in live.ended:
        await store.summarize_session(
            live.tenant,
            session,
            started_at=live.clock.now,
            closed_at=live.clock.now,
            content_sid="",
            correlation="",
        )
    if together:
        delivered = random.Random(3).sample(live.batch, len(live.batch))

        async def not_one_by_one(message: Inbound) -> str:
            raise AssertionError(f"the batch fell back to one by one at {message.message_sid}")

        with monkeypatch.context() as patched:
            patched.setattr(store.inbound, "handle_inbound", not_one_by_one)
            results = await store.handle_batch(delivered)
        outcome_of = {id(m): r for m, r in zip(delivered, results, strict=True)}
        outcomes = [outcome_of[id(m)] for m in live.batch]
    else:
        arrival = sorted(live.batch, key=lambda m: (m.received_at, m.message_sid))
        handled = {id(m): await store.handle_inbound(m) for m in arrival}
        outcomes = [handled[id(m)] for m in live.batch]
    return await _what_happened(pool, _deliveries_in_order(live.batch, outcomes))


def _deliveries_in_order(batch: list[Inbound], outcomes: list[object]) -> list[object]:
    """The outcomes, those of one MessageSid's deliveries sorted: which delivery of a message
    delivered twice at once is the one applied is not defined."""
    by_sid: dict[str, list[object]] = {}
    for message, outcome in zip(batch, outcomes, strict=True):
        by_sid.setdefault(message.message_sid, []).append(outcome)
    sorted_by_sid = {sid: iter(sorted(found, key=repr)) for sid, found in by_sid.items()}
    return [next(sorted_by_sid[message.message_sid]) for message in batch]


async def assert_batch_is_one_by_one(
    store: CatalogStore, pool: asyncpg.Pool, live: Live, monkeypatch: pytest.MonkeyPatch
) -> dict[str, object]:
    one_by_one = await _play(store, pool, live, together=False, monkeypatch=monkeypatch)
    together = await _play(store, pool, live, together=True, monkeypatch=monkeypatch)
    for part, expected in one_by_one.items():
        assert together[part] == expected, part
    return one_by_one


async def test_a_mixed_batch_ends_as_its_messages_one_by_one(
    store: CatalogStore, pool: asyncpg.Pool, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = Live(clock)
    holder, straggler = 1, 2
    earlier_live = uuid.uuid4()
    live.ended = [earlier_live]
    live.before = [
        inbound("E5 Pull 30€ x2", tenant=live.tenant, session=earlier_live, seller=True),
        live.seller("A1 Robe 25€ x4 max3", -100),
        live.seller("B2 Sac 40€ x1", -99),
        live.seller("C3 Pull 30€ x1", -98),
        live.seller("C3 fin", -97),
        live.seller("D4 Jupe 20€ x1", -96),
        live.client(9, "D4", -95, sid="SMd4held"),
        live.client(holder, "A1 x2", 0, sid="SMalreadydone"),
        # A waiter already in the database, received after some of the batch's claims.
        live.client(straggler, "A1 x3", 50),
    ]
    live.confirm = ["SMd4held"]  # D4 sold for good
    redelivered = live.client(3, "A1", 12, sid="SMtwice")
    live.batch = [
        live.client(3, "A1", 10),  # fits: held
        redelivered,  # the same client again: already held
        dataclasses.replace(redelivered),  # the same MessageSid twice in the batch
        live.client(holder, "A1 x2", 0, sid="SMalreadydone"),  # handled before the batch
        live.client(4, "B2", 15),  # held, B2 sold out
        live.client(4, "A1 x2", 20),  # does not fit: waits
        live.client(5, "A1", 30),  # would fit, but a claim received earlier waits
        live.client(5, "B2", 25),  # waits
        live.client(6, "A1 x4", 35),  # over the limit of 3
        live.client(straggler, "A1", 40),  # already waiting, placed after 4, 5 and 7
        live.client(7, "A1", 45),
        live.seller("B2 stock 2", 55),  # a seller's command between claims: promotes 5
        live.client(8, "A1", 60),
        live.client(8, "B2", 65),
        live.client(3, "A1", 70),  # already held
        live.client(4, "A1", 72),  # already waiting
        live.client(holder, "A1", 74),  # already held, before the batch
        live.client(3, "ANNULER A1", 75),  # a cancel between claims: promotes 4
        live.client(3, "A1", 78),  # waits again
        live.client(10, "C3", 80),  # item closed
        live.client(10, "D4", 81),  # sold out for good
        live.client(10, "Z9", 82),  # unknown code
        live.client(10, "bonjour", 83),  # conversation
        live.client(11, "A1", 84, session=uuid.uuid4()),  # a new session: no A1 in it
        live.client(11, "E5", 85),  # an item of the live that ended
        live.client(12, "E5", 86, session=earlier_live),  # in the live that ended
    ]
    one_by_one = await assert_batch_is_one_by_one(store, pool, live, monkeypatch)

    assert one_by_one["outcomes"] == [
        "held",
        "already_held",
        "duplicate",
        "duplicate",
        "held",
        "waiting",
        "waiting",
        "waiting",
        "over_limit",
        "already_waiting",
        "waiting",
        "seller_stock",
        "waiting",
        "waiting",
        "already_held",
        "already_waiting",
        "already_held",
        "cancelled",
        "waiting",
        "item_closed",
        "sold_out",
        "unknown_code",
        "ignored",
        "unknown_code",
        "session_ended",
        "session_ended",
    ]
    to_straggler = await pool.fetch(
        "SELECT body FROM replies WHERE recipient_value = $1 ORDER BY id", "+33610000002"
    )
    # Its place when it claimed again (40 ms): behind 4 (20) and 5 (30), whose claims were
    # received before its first one (50), and not yet behind 7 (45), which came after.
    assert to_straggler[-1]["body"] == "Vous êtes déjà n°3 sur la liste d'attente de A1."


async def test_random_batches_end_as_their_messages_one_by_one(
    store: CatalogStore, pool: asyncpg.Pool, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    for seed in range(8):
        rng = random.Random(seed)
        live = Live(clock)
        codes = ["A1", "B2", "C3"]
        live.before = [
            live.seller(f"{code} Robe 25€ x{rng.randint(1, 4)} max3", -100 + n)
            for n, code in enumerate(codes)
        ]
        # Some claims before the batch, received among the batch's ones.
        live.before += [
            live.client(rng.randint(0, 5), f"{rng.choice(codes)} x{rng.randint(1, 3)}", ms)
            for ms in rng.sample(range(0, 200, 5), 6)
        ]
        live.batch = [
            live.client(rng.randint(0, 7), f"{rng.choice(codes)} x{rng.randint(1, 4)}", ms)
            for ms in rng.sample(range(1, 200), 40)
        ]
        # Redeliveries, of a message of the batch and of one handled before it.
        live.batch += [
            dataclasses.replace(rng.choice(live.batch)),
            dataclasses.replace(rng.choice(live.before[len(codes) :])),
        ]
        await assert_batch_is_one_by_one(store, pool, live, monkeypatch)


async def test_a_batch_parses_each_message_once(
    store: CatalogStore, pool: asyncpg.Pool, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = Live(clock)
    await store.handle_inbound(live.seller("A1 Robe 25€ x2", -10))
    live.batch = [
        live.client(1, "A1", 10),  # claims, applied as a run
        live.client(2, "A1 x2", 20),
        live.client(1, "ANNULER A1", 30),  # a cancel between claims
        live.client(3, "A1", 40),
        live.seller("A1 stock 3", 50),  # a seller's command
        live.client(4, "bonjour", 60),  # conversation
        live.client(5, "A1", 70),  # without a live session (below): not part of a run
    ]
    live.batch[-1] = dataclasses.replace(live.batch[-1], session_id=None)
    parsed: Counter[str] = Counter()

    def counted(parse: Callable[[Grammar, str], object]) -> Callable[[Grammar, str], object]:
        def parse_counted(grammar: Grammar, body: str) -> object:
            parsed[body] += 1
            return parse(grammar, body)

        return parse_counted

    monkeypatch.setattr(Grammar, "parse_client", counted(Grammar.parse_client))
    monkeypatch.setattr(Grammar, "parse_seller", counted(Grammar.parse_seller))

    outcomes = await store.handle_batch(live.batch)

    assert outcomes == [
        "held",
        "waiting",
        "cancelled",  # 2 promoted
        "waiting",
        "seller_stock",  # 3 promoted
        "ignored",
        "waiting",
    ]
    assert parsed == Counter(message.body for message in live.batch)
    assert sum(parsed.values()) == len(live.batch) == 7
