"""The load the faults strike: who writes, what they write, and the outbound messages enqueued
meanwhile, paced at a steady rate of webhooks.

- Shop clients send item codes ("A12": a live signal, a claim once the seller posted the item),
  cancels, chat, and HELP (answered by a COMPLIANCE reply); sellers post items with small
  stocks to their shop (opening its live) and chat. After some client messages, the shop enqueues a
  conversational message to that client (once routing has recorded the inbound message, so
  WhatsApp's 24-hour window is open).
- Stoppers send STOP; once routing reports them opted out, two conversational messages are
  enqueued to each: both must be blocked.
- Togglers send STOP; once opted out, one message is enqueued (must be blocked); when it has
  settled they send START and, once opted in again, one more is enqueued (may be sent).
- One client's number is refused by Twilio (21211) and two messages go to numbers that never
  wrote (outside the 24-hour window): these must be dead-lettered with their reason.

Every webhook and Enqueue is retried through the faults exactly as Twilio and a client service
would (same MessageSid, same idempotency key).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import random
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from snapsell.outbox.v1 import outbox_pb2

from tests.chaos.calls import DriverCalls
from tests.chaos.webhooks import WebhookPoster
from tests.e2e.harness import Shop, inbound_params, new_mobile

# Claims and cancels of the items the sellers post (small stocks, so waitlists form).
ITEM_CODES = ("A12", "B7", "C301", "d5", "ANNULER A12", "A12 x2")
CHAT = ("salut", "Bonjour, il reste du 38 ?", "je prends le A12 svp", "merci !")
SELLER_POSTS = ("A12 Robe 25€ x3", "B7 Sac 30€ x2", "C301 Jupe 15€ x4", "Live ce soir 20h")
HELP = ("HELP", "AIDE")
UNREACHABLE_ERROR_CODE = 21211
# The reduced run inside `make test`: every fault once, in about a minute of load.
DEFAULT_WEBHOOKS = "1500"
DEFAULT_RATE = "30"

FINAL_STATUSES = frozenset(
    {
        outbox_pb2.MESSAGE_STATUS_SENT,
        outbox_pb2.MESSAGE_STATUS_DELIVERED,
        outbox_pb2.MESSAGE_STATUS_READ,
        outbox_pb2.MESSAGE_STATUS_FAILED,
        outbox_pb2.MESSAGE_STATUS_UNDELIVERED,
        outbox_pb2.MESSAGE_STATUS_BLOCKED,
        outbox_pb2.MESSAGE_STATUS_DEAD,
        outbox_pb2.MESSAGE_STATUS_DISCARDED,
    }
)


@dataclass(frozen=True)
class LoadSize:
    webhooks: int
    stoppers: int
    togglers: int
    clients: int
    plain_enqueues: int

    @classmethod
    def from_env(cls, default: str = DEFAULT_WEBHOOKS) -> LoadSize:
        """SNAPSELL_CHAOS_WEBHOOKS webhooks (`make chaos` asks for 5,000), else `default`."""
        return cls.for_webhooks(int(os.environ.get("SNAPSELL_CHAOS_WEBHOOKS", default)))

    @classmethod
    def for_webhooks(cls, webhooks: int) -> LoadSize:
        consent = max(3, webhooks // 100)
        return cls(webhooks, consent, consent, max(30, webhooks // 15), max(10, webhooks // 10))

    @property
    def general(self) -> int:
        """Single webhooks from clients and sellers (the unreachable client writes one more)."""
        return self.webhooks - self.stoppers - 2 * self.togglers - 1


def rate_from_env(variable: str = "SNAPSELL_CHAOS_RATE", default: str = DEFAULT_RATE) -> float:
    """Webhooks per second, held steady while the faults strike."""
    return float(os.environ.get(variable, default))


@dataclass(frozen=True)
class Enqueued:
    message_id: str
    tenant_id: str
    to: str  # E.164
    body: str  # unique: the sandbox's record is matched by it
    # Its recipient was reported opted out before the enqueue and did not opt back in before
    # it settled: blocked is the only right outcome.
    must_block: bool = False
    must_die: bool = False


@dataclass(frozen=True)
class Client:
    shop: Shop
    phone: str


Item = Callable[[], Awaitable[object]]


class Load:
    def __init__(
        self,
        account_sid: str,
        poster: WebhookPoster,
        calls: DriverCalls,
        shops: Sequence[Shop],
        size: LoadSize,
        *,
        rate: float,
        seed: int = 8,
    ) -> None:
        self._account_sid = account_sid
        self._poster = poster
        self._calls = calls
        self._size = size
        self._rate = rate
        self._rng = random.Random(seed)
        self._run = secrets.token_hex(3)
        self._numbers = itertools.count(1)
        self.clients = [Client(shops[i % len(shops)], new_mobile()) for i in range(size.clients)]
        self.unreachable = self.clients[0]
        self.enqueued: list[Enqueued] = []
        # STOP / START / HELP webhooks: each must get exactly one COMPLIANCE reply.
        self.keywords: dict[str, str] = {}
        # Item codes and cancels sent by clients: each must get exactly one catalog reply.
        self.claims: dict[str, str] = {}
        self._shops = shops
        # Client messages that lead to an enqueue, so about `plain_enqueues` happen in all.
        self._enqueue_share = min(1.0, size.plain_enqueues / max(1, size.general * 0.75))

    @property
    def key_prefix(self) -> str:
        return f"chaos-{self._run}-"

    async def run(self, faults_done: asyncio.Event) -> None:
        """Start one item every 1/rate s; return when every webhook was answered 200 and every
        enqueue flow finished (the first failure is raised after all have ended). The last
        tenth waits for `faults_done`, so every fault meets load however slow the machine."""
        loop = asyncio.get_running_loop()
        items = self._items()
        tail = len(items) - len(items) // 10
        start = loop.time()
        tasks: list[asyncio.Task[object]] = []
        for index, item in enumerate(items):
            if index == tail and not faults_done.is_set():
                await faults_done.wait()
                start = loop.time() - index / self._rate  # the same pace from here on
            await asyncio.sleep(max(0.0, start + index / self._rate - loop.time()))
            tasks.append(asyncio.create_task(item()))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise errors[0]

    def _items(self) -> list[Item]:
        items = [self._general() for _ in range(self._size.general)]
        flows: list[Item] = [self._unreachable, self._never_wrote]
        consent_clients = [
            Client(self._shops[i % len(self._shops)], new_mobile())
            for i in range(self._size.stoppers + self._size.togglers)
        ]
        for index, client in enumerate(consent_clients):
            flow = self._stopper if index < self._size.stoppers else self._toggler
            flows.append(functools.partial(flow, client))
        self._rng.shuffle(flows)
        # Spread over the first three quarters, so their follow-ups still meet faults.
        span = max(1, len(items) * 3 // 4)
        for rank, flow in enumerate(flows):
            items.insert(rank * span // len(flows) + rank, flow)
        return items

    # --- items -------------------------------------------------------------------------------

    def _general(self) -> Item:
        rng = self._rng
        roll = rng.random()
        if roll < 0.15:
            shop = rng.choice(self._shops)
            body = rng.choice(SELLER_POSTS)
            return lambda: self._webhook(shop, shop.seller, body, "seller")

        client = rng.choice(self.clients)
        if roll < 0.90:
            kind, body = (
                ("code", rng.choice(ITEM_CODES)) if roll < 0.55 else ("chat", rng.choice(CHAT))
            )
            follow_up = rng.random() < self._enqueue_share and client is not self.unreachable
            return lambda: self._client_message(client, body, kind, follow_up)
        return lambda: self._help(client)

    async def _client_message(self, client: Client, body: str, kind: str, follow_up: bool) -> None:
        sid = await self._webhook(client.shop, client.phone, body, kind)
        if kind == "code":
            self.claims[sid] = body
        if follow_up:
            await self._window_open(client)
            await self._enqueue(client)

    async def _help(self, client: Client) -> None:
        body = self._rng.choice(HELP)
        self.keywords[await self._webhook(client.shop, client.phone, body, "help")] = body

    async def _stopper(self, client: Client) -> None:
        self.keywords[await self._webhook(client.shop, client.phone, "STOP", "stop")] = "STOP"
        await self._opted_out(client, True)
        for _ in range(2):
            await self._enqueue(client, must_block=True)

    async def _toggler(self, client: Client) -> None:
        self.keywords[await self._webhook(client.shop, client.phone, "STOP", "stop")] = "STOP"
        await self._opted_out(client, True)
        blocked = await self._enqueue(client, must_block=True)
        await self._calls.until(
            lambda: self._calls.status(client.shop.tenant_id, blocked),
            lambda status: status in FINAL_STATUSES,
        )
        self.keywords[await self._webhook(client.shop, client.phone, "START", "start")] = "START"
        await self._opted_out(client, False)
        await self._enqueue(client)

    async def _unreachable(self) -> None:
        client = self.unreachable
        await self._webhook(client.shop, client.phone, "salut", "chat")
        await self._window_open(client)
        for _ in range(2):
            await self._enqueue(client, must_die=True)

    async def _never_wrote(self) -> None:
        for shop in self._shops[:2]:
            await self._enqueue(Client(shop, new_mobile()), must_die=True)

    # --- steps --------------------------------------------------------------------------------

    async def _webhook(self, shop: Shop, sender: str, body: str, what: str) -> str:
        params = inbound_params(self._account_sid, shop, sender, body)
        await self._poster.post(params, what)
        return params["MessageSid"]

    async def _window_open(self, client: Client) -> None:
        await self._calls.until(
            lambda: self._calls.consent(client.shop.tenant_id, client.phone),
            lambda reply: reply.HasField("last_inbound_at"),
        )

    async def _opted_out(self, client: Client, wanted: bool) -> None:
        await self._calls.until(
            lambda: self._calls.consent(client.shop.tenant_id, client.phone),
            lambda reply: reply.opted_out == wanted,
        )

    async def _enqueue(
        self, client: Client, *, must_block: bool = False, must_die: bool = False
    ) -> str:
        number = next(self._numbers)
        body = f"Commande {self._run}-{number} prête, passez la chercher !"
        message_id = await self._calls.enqueue(
            client.shop.tenant_id,
            client.shop.sender,
            client.phone,
            body,
            f"{self.key_prefix}{number}",
        )
        self.enqueued.append(
            Enqueued(message_id, client.shop.tenant_id, client.phone, body, must_block, must_die)
        )
        return message_id
