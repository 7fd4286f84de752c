"""The restore drill's load: two waves of real traffic through the whole system, the recovery
target between them. Each wave opens shops (seller_admin's API), has their sellers post an item
by WhatsApp (a live session opens, the catalog posts it), has every client claim it by its code
and some send STOP or START (signed webhooks through the gateway, routing, live_session,
live_catalog and the outbox), then enqueues a message to every client over the outbox's gRPC
API (sent, or blocked for those opted out). The second wave also changes what the first made:
it closes their lives and opens new ones, opts first-wave clients in and out, claims their new
items. After a restore to the target time, the first wave must be all there and the second not
at all.

`settle` waits for a quiet moment: everything posted has been routed, every event relayed,
every reply enqueued, every outbound message sent or blocked, and no transaction writes any
more (the next transaction id stays the same).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from tests.chaos.calls import DriverCalls
from tests.chaos.webhooks import WebhookPoster
from tests.drills.pitr import NEXT_XID
from tests.e2e.harness import Harness, Shop, eventually, new_mobile, shop_from_api
from tests.support.stack import DB_SERVICES

CONCURRENCY = 16  # webhooks in flight, and enqueues
# How long webhooks and enqueues are retried, at the most, from the start of the drill.
RETRY_DEADLINE_S = 1800.0
SETTLE_TIMEOUT_S = 120.0
# How long no transaction may write for the system to count as settled.
QUIET_S = 0.5
# The reduced drill inside `make test`; `make restore-drill` asks for more.
DEFAULT_SHOPS = "2"
DEFAULT_CLIENTS = "10"
# Every fourth client of a shop opts out in the wave that opens it.
STOPPER_EVERY = 4

_UNSETTLED = """
SELECT
    (SELECT count(*) FROM routing.processed_inbound WHERE message_sid = ANY($1::text[]))
        < cardinality($1::text[]) AS unrouted,
    EXISTS (SELECT 1 FROM outbox.messages WHERE status IN ('pending', 'sending')) AS unsent,
    EXISTS (SELECT 1 FROM live_catalog.replies WHERE enqueued_at IS NULL AND failure IS NULL)
        AS unreplied
"""
_UNRELAYED = "SELECT EXISTS (SELECT 1 FROM {schema}.events WHERE published_at IS NULL)"


@dataclass(frozen=True)
class DrillSize:
    shops: int  # opened by each wave
    clients: int  # per shop

    @classmethod
    def from_env(cls) -> DrillSize:
        """SNAPSELL_DRILL_SHOPS shops per wave, SNAPSELL_DRILL_CLIENTS clients per shop."""
        return cls(
            int(os.environ.get("SNAPSELL_DRILL_SHOPS", DEFAULT_SHOPS)),
            int(os.environ.get("SNAPSELL_DRILL_CLIENTS", DEFAULT_CLIENTS)),
        )


@dataclass(frozen=True)
class ShopLoad:
    shop: Shop
    clients: tuple[str, ...]

    @property
    def stoppers(self) -> frozenset[str]:
        """The clients who send STOP in the wave that opens the shop."""
        return frozenset(self.clients[::STOPPER_EVERY])


@dataclass(frozen=True)
class Conversation:
    shop: Shop
    sender: str
    bodies: tuple[str, ...]  # posted one after the other


@dataclass
class Wave:
    opened: list[ShopLoad] = field(default_factory=list)
    webhooks: list[str] = field(default_factory=list)  # MessageSids answered 200
    enqueued: list[tuple[Shop, str]] = field(default_factory=list)  # (shop, message id)


class Traffic:
    """Drives the system through its public doors and watches its database for the moment it
    has settled. Webhooks and enqueues are retried as Twilio and a calling service would (same
    MessageSid, same idempotency key), so a slow machine slows the drill but does not fail it;
    shops are opened, lives closed and answers read through the end-to-end harness."""

    def __init__(self, harness: Harness) -> None:
        stack = harness.stack
        self.harness = harness
        self._admin_dsn = stack.admin_dsn
        self._poster = WebhookPoster(
            stack.public_base_url,
            stack.auth_token,
            concurrency=CONCURRENCY,
            deadline_s=RETRY_DEADLINE_S,
        )
        self._calls = DriverCalls(
            stack.address("outbox"),
            stack.address("routing"),
            stack.keys,
            deadline_s=RETRY_DEADLINE_S,
        )
        self._enqueue_slots = asyncio.Semaphore(CONCURRENCY)
        self._names = itertools.count(1)

    async def close(self) -> None:
        await self._poster.close()
        await self._calls.close()

    async def first_wave(
        self, size: DrillSize, *, alongside: Callable[[], Awaitable[None]]
    ) -> Wave:
        """Shops open, clients claim and some opt out; `alongside()` (the base backup) runs
        while the clients write, and they go on writing until it is done."""
        wave = Wave()
        wave.opened = await self._open_shops(wave, size)
        await self._converse(wave, _opening_talk(wave.opened), alongside)
        await self._enqueue_to_every_client(wave, wave.opened)
        return wave

    async def second_wave(self, size: DrillSize, earlier: Sequence[ShopLoad]) -> Wave:
        """New shops as in the first wave; the earlier shops' lives are closed and new ones
        opened, half their stoppers opt back in, other clients opt out, the rest claim."""
        wave = Wave()
        for load in earlier:
            live = await self.harness.current_session(load.shop)
            assert live is not None, f"{load.shop.tenant_id} has no live to close"
            await self.harness.close_session(load.shop, live.session_id)
        wave.opened = await self._open_shops(wave, size)
        await self._post(
            wave,
            [Conversation(load.shop, load.shop.seller, ("B7 Jupe 15€ x2",)) for load in earlier],
        )
        talk = _opening_talk(wave.opened)
        for load in earlier:
            restarting = sorted(load.stoppers)[::2]
            for index, client in enumerate(load.clients):
                if client in restarting:
                    bodies: tuple[str, ...] = ("START",)
                elif client not in load.stoppers and index % STOPPER_EVERY == 1:
                    bodies = ("B7", "STOP")
                else:
                    bodies = ("B7",)
                talk.append(Conversation(load.shop, client, bodies))
        await self._converse(wave, talk)
        await self._enqueue_to_every_client(wave, [*wave.opened, *earlier])
        return wave

    async def settle(self, wave: Wave) -> None:
        """Wait until the system is quiet (see the module's docstring)."""
        conn = await asyncpg.connect(self._admin_dsn)
        try:
            previous: int | None = None

            async def quiet() -> bool:
                nonlocal previous
                busy = await conn.fetchrow(_UNSETTLED, wave.webhooks)
                assert busy is not None
                unrelayed = [
                    await conn.fetchval(_UNRELAYED.format(schema=schema)) for schema in DB_SERVICES
                ]
                # The next transaction id: unchanged means no transaction wrote meanwhile.
                next_xid = int(await conn.fetchval(NEXT_XID))
                unchanged, previous = next_xid == previous, next_xid
                return unchanged and not any(busy.values()) and not any(unrelayed)

            await eventually(quiet, timeout_s=SETTLE_TIMEOUT_S, every_s=QUIET_S)
        finally:
            await conn.close()

    # --- steps ---------------------------------------------------------------------------------

    async def _open_shops(self, wave: Wave, size: DrillSize) -> list[ShopLoad]:
        shops = [
            await shop_from_api(self.harness.stack, f"drill-{next(self._names)}")
            for _ in range(size.shops)
        ]
        opened = [
            ShopLoad(shop, tuple(new_mobile() for _ in range(size.clients))) for shop in shops
        ]
        # Before any client writes: a seller's message opens the live, clients claim its item.
        await self._post(
            wave, [Conversation(shop, shop.seller, ("A12 Robe 25€ x3",)) for shop in shops]
        )
        return opened

    async def _converse(
        self,
        wave: Wave,
        talk: Sequence[Conversation],
        alongside: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Post every conversation, then wait until settled; `alongside()` starts once a third
        of them are done, and clients keep chatting until it has finished."""
        third = len(talk) // 3
        await self._post(wave, talk[:third])
        task = asyncio.ensure_future(alongside()) if alongside is not None else None
        await self._post(wave, talk[third:])
        for chatter in itertools.cycle(talk):
            if task is None or task.done():
                break
            await self._post(wave, [Conversation(chatter.shop, chatter.sender, ("merci !",))])
        if task is not None:
            await task
        await self.settle(wave)

    async def _post(self, wave: Wave, talk: Sequence[Conversation]) -> None:
        async def one(conversation: Conversation) -> None:
            for body in conversation.bodies:
                params = self.harness.inbound(conversation.shop, conversation.sender, body)
                await self._poster.post(params, body)
                wave.webhooks.append(params["MessageSid"])

        await asyncio.gather(*(one(conversation) for conversation in talk))

    async def _enqueue_to_every_client(self, wave: Wave, loads: Sequence[ShopLoad]) -> None:
        async def one(shop: Shop, client: str) -> None:
            key = f"drill-{uuid.uuid4().hex}"
            async with self._enqueue_slots:
                message_id = await self._calls.enqueue(
                    shop.tenant_id, shop.sender, client, "Votre commande est prête", key
                )
            wave.enqueued.append((shop, message_id))

        await asyncio.gather(*(one(load.shop, client) for load in loads for client in load.clients))
        await self.settle(wave)


def _opening_talk(opened: Sequence[ShopLoad]) -> list[Conversation]:
    """Every client of a new shop claims its item; the stoppers then opt out."""
    return [
        Conversation(load.shop, client, ("A12", "STOP") if client in load.stoppers else ("A12",))
        for load in opened
        for client in load.clients
    ]
