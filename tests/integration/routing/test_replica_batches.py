"""Two routing replicas, each with its own pool, routing overlapping batches of the same
contacts' messages at the same time, delivered to them in opposite orders: no deadlock (every
batch takes its row and advisory locks in a stable order), every message routed exactly once,
and the consent and last-inbound rows those of the newest message of each contact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, timedelta

import asyncpg
import pytest
from snapsell.gateway.v1 import events_pb2 as gateway_events

from infra.db import create_pool
from services.routing.clients import Sender
from services.routing.domain import RulesBook, SenderRole
from services.routing.inbound import Delivery, InboundRouter, Routed, RouteOutcome
from tests.integration.routing.conftest import SERVICE
from tests.integration.routing.fakes import (
    SHOP_NUMBER,
    FakeReplies,
    FakeSenders,
    FakeSessions,
    inbound,
    minutes_ago,
)

# Two tenants, 16 people each: a round is 96 messages, about a batch (ROUTING_BATCH_SIZE: 100).
OTHER_SHOP_NUMBER = "+14155230000"
SHOPS = {SHOP_NUMBER: "shop-1", OTHER_SHOP_NUMBER: "shop-2"}
CONTACTS = [
    (f"+336100000{index:02d}", SHOP_NUMBER if index % 2 else OTHER_SHOP_NUMBER)
    for index in range(32)
]
ROUNDS = 72
ROUNDS_AT_ONCE = 6


class TwoShops(FakeSenders):
    async def resolve(self, message: gateway_events.MessageReceived) -> Sender | None:
        tenant = SHOPS.get(message.recipient.value)
        return None if tenant is None else Sender(tenant, SenderRole.CLIENT)


class RecordingRouter(InboundRouter):
    """Keeps every error a batch's transaction raised: the router splits a failed batch and
    retries the halves, so a deadlock would otherwise go unseen in the outcomes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(
            pool,
            senders=TwoShops(),
            sessions=FakeSessions(),
            replies=FakeReplies(),
            rules=RulesBook(),
        )
        self.errors: list[Exception] = []

    async def _route_together(self, deliveries: Sequence[Delivery]) -> list[Routed]:
        try:
            return await super()._route_together(deliveries)
        except Exception as error:
            self.errors.append(error)
            raise


@pytest.fixture
async def replicas(service_dsn: str, clean: asyncpg.Pool) -> AsyncIterator[list[RecordingRouter]]:
    """Two replicas' routers, each on its own pool (a connection per concurrent batch)."""
    pools = [
        await create_pool(service_dsn, SERVICE, min_size=1, max_size=ROUNDS_AT_ONCE)
        for _ in range(2)
    ]
    yield [RecordingRouter(pool) for pool in pools]
    for pool in pools:
        await pool.close()


def _round(number: int) -> list[gateway_events.MessageReceived]:
    """Every person's messages of one round, received one second apart, rounds one after the
    other. Every other round has a consent keyword (a reply, so the last inbound is committed
    before the batch's transaction; START and STOP in turn), a chat message (last inbound in
    the transaction) and a HELP (a reply); the others have no keyword, so their transactions
    take no consent lock before the last inbound rows, and go at those rows together."""
    if number % 2:
        bodies = ("salut", "HELP", "ok")
    else:
        bodies = ("STOP" if number % 4 == 2 else "START", "salut", "HELP")
    first = minutes_ago(60) + timedelta(seconds=number * len(CONTACTS) * len(bodies))
    return [
        inbound(
            body,
            sender=sender,
            to=shop,
            at=first + timedelta(seconds=index * len(bodies) + offset),
        )
        for index, (sender, shop) in enumerate(CONTACTS)
        for offset, body in enumerate(bodies)
    ]


def _batches(
    number: int, messages: list[gateway_events.MessageReceived]
) -> tuple[list[gateway_events.MessageReceived], list[gateway_events.MessageReceived]]:
    """What each replica gets of a round, the second in the opposite order, while other rounds
    of the same people are routed: a keyword round whole to both (a redelivery, a second copy);
    of the others, every person's first message to one, their other two to the other (both
    batches are then routed, and write the same people's last inbound rows together)."""
    if number % 2 == 0:
        return messages, messages[::-1]
    return messages[::3], [m for index, m in enumerate(messages) if index % 3][::-1]


async def test_overlapping_batches_on_two_replicas_route_each_message_once_without_deadlock(
    clean: asyncpg.Pool, replicas: list[RecordingRouter]
) -> None:
    first, second = replicas
    rounds = [_round(number) for number in range(ROUNDS)]
    routed: dict[str, int] = {}

    async def route(
        router: RecordingRouter, messages: Sequence[gateway_events.MessageReceived]
    ) -> None:
        deliveries = [Delivery(m, n) for n, m in enumerate(messages, start=1)]
        for delivery, outcome in zip(deliveries, await router.route_batch(deliveries), strict=True):
            assert isinstance(outcome, Routed), outcome
            if outcome.outcome is not RouteOutcome.DUPLICATE:
                sid = delivery.message.message_sid
                routed[sid] = routed.get(sid, 0) + 1

    for wave in range(0, ROUNDS, ROUNDS_AT_ONCE):
        await asyncio.gather(
            *(
                route(router, batch)
                for number in range(wave, min(wave + ROUNDS_AT_ONCE, ROUNDS))
                for router, batch in zip(
                    (first, second), _batches(number, rounds[number]), strict=True
                )
            )
        )

    assert first.errors == [] and second.errors == []
    every = [message for messages in rounds for message in messages]
    sids = {m.message_sid for m in every}
    assert routed == dict.fromkeys(sids, 1)  # each by one replica, once
    ledger = await clean.fetch("SELECT message_sid FROM processed_inbound")
    assert sorted(r["message_sid"] for r in ledger) == sorted(sids)
    assert await clean.fetchval(
        "SELECT count(*) FROM events WHERE subject = 'routing.v1.message.routed'"
    ) == len(sids)

    keywords = [m.message_sid for m in every if m.body in ("STOP", "START")]
    log = await clean.fetch("SELECT message_sid FROM consent_log")
    assert sorted(r["message_sid"] for r in log) == sorted(keywords)
    # Every person's newest keyword is the last keyword round's.
    last_keyword = next(m.body for m in reversed(every) if m.body in ("STOP", "START"))
    assert last_keyword == "STOP"  # ROUNDS is chosen so: the opt-outs are rows to compare
    opted_out = await clean.fetch("SELECT tenant_id, address FROM opt_outs")
    everyone = [(SHOPS[shop], sender) for sender, shop in CONTACTS]
    assert sorted(tuple(r) for r in opted_out) == sorted(everyone)

    newest = {(SHOPS[m.recipient.value], m.sender.value): m for m in rounds[-1]}
    rows = await clean.fetch(
        "SELECT tenant_id, address, last_inbound_at, message_sid FROM last_inbound"
    )
    assert {
        (r["tenant_id"], r["address"]): (r["last_inbound_at"], r["message_sid"]) for r in rows
    } == {key: (m.received_at.ToDatetime(tzinfo=UTC), m.message_sid) for key, m in newest.items()}
