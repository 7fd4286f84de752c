"""Live catalog claims benchmark: latency through the whole system, a 1,000-claim burst, the
same burst against the obvious `SELECT ... FOR UPDATE` peer, and an end-of-live summary.

    python -m tools.bench.claims_bench [--rate 100] [--seconds 10] [--burst 1000]

The whole system as separate processes (`tools.stack`, as `make run` starts it) on a fresh
embedded PostgreSQL and NATS JetStream (or DATABASE_URL / NATS_URL, the services' schemas dropped
first). One shop with a seller phone is set up with the operator CLI; the seller posts the items
by WhatsApp webhook, so a live session is open.

1. Latency: `--rate` claims/s (`A1`, stock 600, each from a new WhatsApp client) posted
   open-loop as signed webhooks for `--seconds` after a warm-up (the e2e bench's `Phases`);
   latency = webhook released -> the outbox's row for the reply created (the outbox accepted it;
   correlation id = the webhook's MessageSid). Figure `claim_to_outbox_p99_ms`.
2. Burst: `--burst` routed claims on `B1` (stock 10) published at once onto ROUTING_EVENTS, the
   catalog's input stream; settled when every reservation or waitlist row is committed and every
   reply enqueued to the outbox. Figures `burst_settled_s`, `burst_claims_per_s`, and
   `burst_decided_s` (until every row was committed, replies aside).
3. Peer, with the services stopped (nothing else writes): the same burst handed straight to the
   store, `--concurrency` in flight, once as the catalog's consumer does it (the messages in
   flight applied together in one transaction, in received_at order, one conditional UPDATE
   per item deciding its claims) and once as the obvious peer (one transaction per claim:
   `SELECT ... FOR UPDATE`, decide, `UPDATE`), each on a fresh item of stock 10;
   `store_vs_peer_ratio` = our claims/s / the peer's.
4. Summary: a session of 500 items and 5,000 reservations summarised (`summary_s`).
Oversell is checked after 2 and 3 (`*_oversold`: units held beyond stock, item counters or
reservation rows); every figure with a target prints MISSED on stderr when missed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.routing.v1 import events_pb2 as routing_events
from snapsell.routing.v1 import routing_pb2

from infra import jetstream
from infra.db import Connection, create_pool
from services.live_catalog.consumer import Batches
from services.live_catalog.domain import Channel, Contact, Inbound, Item, ReplyRoute, SettingsBook
from services.live_catalog.reservations import ITEM_COLUMNS, ReservationBook, item_from_row
from services.live_catalog.store import CatalogStore
from tools.bench.e2e_bench import Phases, configure_sandbox, phases_parser
from tools.bench.harness import bench_stack, run_whole_system, say_missed
from tools.bench.webhooks import BUSINESS_NUMBER, WEBHOOK_PATH, new_nonce, signed_webhooks
from tools.stack import SystemStack

TENANT = "claims-bench"
SELLER_CLIENT = 99_000_000  # client number of the seller (`webhooks.client_address`)
SELLER_BATCH = 0x7F
TARGETS = {
    "claim_to_outbox_p99_ms": "<= 250",
    "burst_settled_s": "<= 5",
    "store_vs_peer_ratio": ">= 2",
    "burst_oversold": "== 0",
    "store_oversold": "== 0",
    "peer_oversold": "== 0",
    "summary_s": "<= 2",
}
HOLD = timedelta(minutes=30)
SETTLE_TIMEOUT_S = 60.0
_BURST_PROGRESS = """
SELECT (SELECT count(*) FROM live_catalog.reservations WHERE item_id = $1) AS decided,
    (SELECT count(*) FROM live_catalog.replies
     WHERE left(correlation_id, length($2)) = $2 AND enqueued_at IS NOT NULL) AS enqueued
"""
# Units held or confirmed beyond stock, or counters that disagree with the reservation rows.
_OVERSOLD = """
SELECT greatest(i.held + i.confirmed - i.stock, 0)
     + abs(i.held - (SELECT coalesce(sum(quantity), 0) FROM live_catalog.reservations
                     WHERE item_id = i.id AND status = 'held'))
     + abs(i.waiting - (SELECT count(*) FROM live_catalog.reservations
                        WHERE item_id = i.id AND status = 'waiting'))
FROM live_catalog.items i WHERE i.id = $1
"""
_PEER_LOCK = f"SELECT {ITEM_COLUMNS} FROM items WHERE id = $1 AND status = 'open' FOR UPDATE"
_PEER_EARLIER_WAITING = """
SELECT EXISTS (SELECT 1 FROM reservations WHERE item_id = $1 AND status = 'waiting'
    AND (received_at, message_sid) < ($2, $3))
"""
_PEER_SET = f"""
UPDATE items SET held = $2, waiting = $3, updated_at = $4 WHERE id = $1 RETURNING {ITEM_COLUMNS}
"""


def say(line: str) -> None:
    print(f"claims bench: {line}", file=sys.stderr, flush=True)


class LockingPeer(ReservationBook):
    """The obvious claim: lock the item row, read it, decide in Python, write the counters."""

    async def take(
        self,
        conn: Connection,
        item: Item,
        quantity: int,
        received_at: datetime,
        message_sid: str,
        now: datetime,
    ) -> tuple[bool, Item] | None:
        row = await conn.fetchrow(_PEER_LOCK, item.id)
        if row is None:
            return None
        locked = item_from_row(row)
        earlier = await conn.fetchval(_PEER_EARLIER_WAITING, item.id, received_at, message_sid)
        granted = locked.held + locked.confirmed + quantity <= locked.stock and not earlier
        held = locked.held + quantity if granted else locked.held
        waiting = locked.waiting if granted else locked.waiting + 1
        return granted, item_from_row(await conn.fetchrow(_PEER_SET, item.id, held, waiting, now))


async def seed_summary_session(
    pool: asyncpg.Pool, tenant: str, session: uuid.UUID, now: datetime
) -> None:
    """An open session of 500 items (stock 10) with 10 reservations each (8 held, 2 confirmed)
    from 2,000 buyers; `pool` has the live_catalog schema first on its search path."""
    await pool.execute(
        "INSERT INTO sessions (id, tenant_id, status, opened_at) VALUES ($1, $2, 'open', $3)",
        session,
        tenant,
        now,
    )
    await pool.execute(
        "INSERT INTO items (id, tenant_id, session_id, code, title, price_cents, currency, stock,"
        " held, confirmed, max_per_client, status, created_at, updated_at)"
        " SELECT gen_random_uuid(), $1, $2, 'A' || g, 'Article ' || g, 1000 + g, 'EUR', 10,"
        " 8, 2, 1, 'open', $3, $3 FROM generate_series(1, 500) g",
        tenant,
        session,
        now,
    )
    await pool.execute(
        "INSERT INTO reservations (id, tenant_id, session_id, item_id, client_channel,"
        " client_value, reply_from, account_sid, quantity, status, message_sid, received_at,"
        " expires_at, created_at, updated_at)"
        " SELECT gen_random_uuid(), $1, $2, i.id, 'whatsapp', '+3361' || (n % 2000), 'MG1',"
        " 'AC1', 1, CASE WHEN n % 10 < 8 THEN 'held' ELSE 'confirmed' END,"
        " 'SM' || i.code || '-' || n || '-' || $2, $3::timestamptz,"
        " CASE WHEN n % 10 < 8 THEN $3::timestamptz + interval '30 minutes' END, $3, $3"
        " FROM (SELECT id, code, row_number() OVER (ORDER BY code) AS k FROM items"
        "       WHERE session_id = $2) i,"
        " generate_series(0, 9) r, LATERAL (SELECT (i.k - 1) * 10 + r AS n) x",
        tenant,
        session,
        now,
    )


def routed_claim(
    stack: SystemStack, session: str, sid: str, client: str, at: datetime
) -> routing_events.MessageRouted:
    """What routing publishes for a client's `B1` in the live `session`."""
    received = Timestamp()
    received.FromDatetime(at)
    whatsapp = address_pb2.CHANNEL_WHATSAPP
    return routing_events.MessageRouted(
        tenant_id=TENANT,
        sender_role=routing_pb2.SENDER_ROLE_CLIENT,
        decision=routing_events.ROUTING_DECISION_LIVE_SIGNAL,
        live_session_id=session,
        message=gateway_events.MessageReceived(
            message_sid=sid,
            account_sid=stack.account_sid,
            sender=address_pb2.Address(channel=whatsapp, value=client),
            recipient=address_pb2.Address(channel=whatsapp, value=BUSINESS_NUMBER),
            body="B1",
            received_at=received,
        ),
    )


def catalog_store(pool: asyncpg.Pool, book: ReservationBook) -> CatalogStore:
    return CatalogStore(
        pool,
        lambda: datetime.now(UTC),
        hold=HOLD,
        settings=SettingsBook(),
        default_max_per_client=1,
        book=book,
    )


async def handle_concurrently(
    handle: Callable[[Inbound], Awaitable[str]], claims: list[Inbound], concurrency: int
) -> None:
    """Every claim through `handle`, `concurrency` in flight, as the consumer hands them over."""
    queue = iter(claims)

    async def handle_all() -> None:
        for claim in queue:
            await handle(claim)

    await asyncio.gather(*(handle_all() for _ in range(concurrency)))


class ClaimsBench:
    def __init__(
        self,
        args: argparse.Namespace,
        stack: SystemStack,
        db: asyncpg.Pool,
        infra_pids: dict[str, int],
    ) -> None:
        self.args, self.stack, self.db, self.infra_pids = args, stack, db, infra_pids
        self.figures: dict[str, float] = {}
        self.notes: list[str] = []
        self.nonce = new_nonce()
        self._sids = itertools.count()

    async def set_up_shop(self) -> None:
        seller = f"+336{SELLER_CLIENT % 100_000_000:08d}"
        await self.stack.operator_cli(
            ("create-tenant", "--tenant", TENANT, "--name", "Claims bench"),
            ("add-channel", "--tenant", TENANT, "--address", f"whatsapp:{BUSINESS_NUMBER}"),
            ("add-seller", "--tenant", TENANT, "--phone", seller),
        )

    async def post_item(self, index: int, text: str, code: str) -> uuid.UUID:
        """The seller posts an item by WhatsApp; returns its id once the catalog has it."""
        url = self.stack.public_base_url + WEBHOOK_PATH
        [webhook] = signed_webhooks(
            url,
            self.stack.account_sid,
            self.stack.auth_token,
            count=1,
            batch=SELLER_BATCH - index,
            nonce=self.nonce,
            body=text,
            first_client=SELLER_CLIENT,
        )
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": webhook.signature,
        }
        async with httpx.AsyncClient(timeout=10) as client:
            (await client.post(url, content=webhook.body, headers=headers)).raise_for_status()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            item_id = await self.db.fetchval(
                "SELECT id FROM live_catalog.items WHERE tenant_id = $1 AND code = $2",
                TENANT,
                code,
            )
            if item_id is not None:
                return uuid.UUID(str(item_id))
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the catalog never got item {code} posted by the seller")

    async def latency(self) -> None:
        phases = Phases(self.args, self.stack, self.db, self.infra_pids, body="A1")
        say("warm-up")
        await phases.warm_up()
        say(f"{self.args.rate:g} claims/s for {self.args.seconds:g} s")
        summary = await phases.measure(1, self.args.rate)
        prefix = f"r{self.args.rate:g}_"
        self.figures["claim_to_outbox_p99_ms"] = phases.figures[prefix + "enqueued_p99_ms"]
        self.figures["claim_to_outbox_p50_ms"] = phases.figures[prefix + "enqueued_p50_ms"]
        self.figures["claim_to_sandbox_p99_ms"] = phases.figures[prefix + "p99_ms"]
        self.figures["claims_webhook_rps"] = phases.figures[prefix + "webhook_rps"]
        self.figures["claims_unanswered"] = summary.unrouted + summary.non200
        # Where the unanswered ones were at the cut: not routed yet, or not decided yet.
        sid_prefix = phases.prefix(1)
        for stage in ("routing", "live_catalog"):
            self.figures[f"cut_{stage}_handled"] = await self.db.fetchval(
                f"SELECT count(*) FROM {stage}.processed_inbound WHERE left(message_sid, 12) = $1",
                sid_prefix,
            )
        # The burst starts on an idle system.
        await phases.settle(1, summary)
        self.notes += phases.notes

    async def burst(self, item_id: uuid.UUID) -> None:
        session = await self.db.fetchval(
            "SELECT session_id FROM live_catalog.items WHERE id = $1", item_id
        )
        prefix = f"SMburst{self.nonce:08x}"
        start = datetime.now(UTC)
        messages = [
            jetstream.Outgoing(
                "routing.v1.message.routed",
                routed_claim(
                    self.stack,
                    str(session),
                    f"{prefix}{i:019d}",
                    f"+3377{i:07d}",
                    start + timedelta(microseconds=i),
                ).SerializeToString(),
                f"{prefix}{i:019d}",
            )
            for i in range(self.args.burst)
        ]
        client = await jetstream.connect(self.stack.nats_url, name="claims-bench")
        try:
            publisher = jetstream.AckedPublisher(client)
            await publisher.start()
            say(f"burst of {self.args.burst} claims on B1")
            began = time.monotonic()
            await publisher.publish_batch(messages, ack_timeout_s=30.0)
            decided_s, settled_s = await self.wait_settled(item_id, prefix, began)
        finally:
            await client.close()
        if settled_s is None:
            self.notes.append(f"burst: not settled after {SETTLE_TIMEOUT_S:g} s")
        settled_s = settled_s or float("nan")
        self.figures["burst_decided_s"] = round(decided_s or float("nan"), 3)
        self.figures["burst_settled_s"] = round(settled_s, 3)
        self.figures["burst_claims_per_s"] = round(self.args.burst / settled_s, 1)
        self.figures["burst_oversold"] = await self.db.fetchval(_OVERSOLD, item_id)

    async def wait_settled(
        self, item_id: uuid.UUID, prefix: str, began: float
    ) -> tuple[float | None, float | None]:
        """Seconds from `began` until every claim of the burst was decided (its reservation or
        waitlist row committed), and until every reply was also enqueued (None: not in time)."""
        decided: float | None = None
        while time.monotonic() < began + SETTLE_TIMEOUT_S:
            row = await self.db.fetchrow(_BURST_PROGRESS, item_id, prefix)
            assert row is not None
            if decided is None and row["decided"] >= self.args.burst:
                decided = time.monotonic() - began
            if decided is not None and row["enqueued"] >= self.args.burst:
                return decided, time.monotonic() - began
            await asyncio.sleep(0.01)
        return decided, None

    async def against_peer(self, session: uuid.UUID) -> None:
        """The burst straight into the store, ours then the peer's, services stopped."""
        pool = await create_pool(
            self.stack.admin_dsn,
            "live_catalog",
            min_size=self.args.concurrency,
            max_size=self.args.concurrency,
        )
        try:
            rates: dict[str, float] = {}
            ours = catalog_store(pool, ReservationBook(HOLD))
            peer = catalog_store(pool, LockingPeer(HOLD))
            # Ours as the consumer runs it (the messages in flight decided in one transaction,
            # one conditional UPDATE per item); the peer's one transaction per claim.
            handlers = (("store", Batches(ours).submit), ("peer", peer.handle_inbound))
            for n, (name, handle) in enumerate(handlers, start=1):
                code = f"P{n}"
                await ours.handle_inbound(self.inbound(session, f"{code} Robe 25€ x10", True))
                claims = [self.inbound(session, code, False) for _ in range(self.args.burst)]
                began = time.monotonic()
                await handle_concurrently(handle, claims, self.args.concurrency)
                rates[name] = self.args.burst / (time.monotonic() - began)
                item_id = await pool.fetchval("SELECT id FROM items WHERE code = $1", code)
                self.figures[f"{name}_claims_per_s"] = round(rates[name], 1)
                self.figures[f"{name}_oversold"] = await self.db.fetchval(_OVERSOLD, item_id)
            self.figures["store_vs_peer_ratio"] = round(rates["store"] / rates["peer"], 2)
        finally:
            await pool.close()

    def inbound(self, session: uuid.UUID, body: str, seller: bool) -> Inbound:
        n = next(self._sids)
        return Inbound(
            message_sid=f"SMpeer{self.nonce:08x}{n:020d}",
            tenant_id=TENANT,
            from_seller=seller,
            session_id=session,
            body=body,
            received_at=datetime.now(UTC),
            contact=Contact(Channel.WHATSAPP, f"+3378{n:07d}"),
            route=ReplyRoute(f"whatsapp:{BUSINESS_NUMBER}", self.stack.account_sid),
        )

    async def summary(self) -> None:
        pool = await create_pool(self.stack.admin_dsn, "live_catalog", min_size=1, max_size=4)
        try:
            store = catalog_store(pool, ReservationBook(HOLD))
            tenant, session, now = f"{TENANT}-summary", uuid.uuid4(), datetime.now(UTC)
            await seed_summary_session(pool, tenant, session, now)
            began = time.monotonic()
            done = await store.summarize_session(
                tenant, session, started_at=now, closed_at=now, content_sid="", correlation=""
            )
            self.figures["summary_s"] = round(time.monotonic() - began, 3)
            if done is None or (len(done.totals.items), done.buyer_summaries) != (500, 2000):
                raise RuntimeError(f"the summary is not the seeded session's: {done}")
        finally:
            await pool.close()


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    service_env = {"outbox": {"OUTBOX_RATE_LIMIT_PER_SENDER": "2000"}}
    say("starting the stack")
    system = bench_stack(work_dir=workdir, env={"LOG_LEVEL": "WARNING"}, service_env=service_env)
    async with (
        system as (stack, found),
        asyncpg.create_pool(found.dsn, min_size=1, max_size=4) as db,
    ):
        bench = ClaimsBench(args, stack, db, found.pids)
        await configure_sandbox(stack)
        await bench.set_up_shop()
        await bench.post_item(0, "A1 Robe rouge 25€ x600", "A1")
        burst_item = await bench.post_item(1, "B1 Sac 40€ x10", "B1")
        await bench.latency()
        await bench.burst(burst_item)
        await stack.stop()  # the peer runs with nothing else writing
        session = await db.fetchval(
            "SELECT session_id FROM live_catalog.items WHERE id = $1", burst_item
        )
        await bench.against_peer(session)
        await bench.summary()
    say_missed(say, bench.figures, TARGETS)
    params = {
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "burst": args.burst,
        "peer_concurrency": args.concurrency,
        "latency": "webhook released -> the outbox's row for the reply created",
        "items": "A1 stock 600 (latency), B1 stock 10 (burst), stock 10 each (peer run)",
    }
    return {
        "bench": "claims",
        "figures": bench.figures,
        "targets": TARGETS,
        "params": params,
        "notes": bench.notes,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = phases_parser("Live catalog claims: latency, burst, peer.", 120.0, 32)
    parser.add_argument("--rate", type=float, default=100.0, help="claims/s in the latency phase")
    parser.add_argument("--burst", type=int, default=1000, help="claims in the burst")
    parser.add_argument("--concurrency", type=int, default=32, help="claims in flight (peer run)")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.burst < 1 or args.concurrency < 1:
        parser.error("--rate, --seconds, --burst and --concurrency must be positive")
    return args


def main(argv: list[str]) -> int:
    return run_whole_system("claims", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
