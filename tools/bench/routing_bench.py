"""Routing benchmark: inbound stream -> `MessageRouted`, with real peers.

    python -m tools.bench.routing_bench [--messages 5000] [--rate 300] [--duration 20]

Starts (unless DATABASE_URL / NATS_URL point at running ones) an embedded PostgreSQL and NATS
JetStream, the Twilio sandbox, and seller_admin, live_session, outbox and routing as separate
processes, as `make run` does; sets up `--tenants` shops through seller_admin's API; then
publishes `MessageReceived` to the INBOUND stream as the gateway does (client item codes, seller
posts, small talk, STOP/START) and times each message until its `routing.v1.message.routed`
event arrives from JetStream (after routing's commit and the event relay).

1. Throughput: `--messages` published as fast as possible; messages/s from the first publish
   to the last MessageRouted.
2. Lag: a steady `--rate` messages/s for `--duration` s, open loop; p50/p99/max from each
   message's scheduled publish time to its MessageRouted.

Targets (`TARGETS`): routing alone must carry the e2e targets (`tools.bench.e2e_bench`): 750
messages/s, and at 300/s a p99 well inside the e2e's 100 ms.

Prints one JSON line. Everything it started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
import uuid
from collections.abc import Iterator

from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.routing.v1 import events_pb2

from infra import jetstream
from tools.bench.harness import at_rate, bench_stack, create_shop
from tools.bench.stats import peak_rss_mb, percentile
from tools.stack import SystemStack

SERVICES = ("seller_admin", "live_session", "outbox", "routing")
INBOUND_SUBJECT = "gateway.v1.message.received"
ROUTED_SUBJECT = "routing.v1.message.routed"
# routing's mean handling time and peer-call latencies, from its /metrics.
_BREAKDOWN = (
    ("snapsell_routing_inbound_handling_seconds", "batch_handling"),
    ('snapsell_routing_peer_call_seconds{code="OK",method="ResolveSender"}', "resolve"),
    ('snapsell_routing_peer_call_seconds{code="OK",method="Touch"}', "touch"),
    ('snapsell_routing_peer_call_seconds{code="OK",method="EnqueueMany"}', "enqueue"),
)


def routing_breakdown(stack: SystemStack) -> dict[str, float]:
    """Mean time to route a batch and mean peer-call latencies from routing's /metrics
    (ms)."""
    with urllib.request.urlopen(stack.metrics_url("routing"), timeout=5) as reply:
        text = reply.read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        for metric, key in _BREAKDOWN:
            base, _, labels = metric.partition("{")
            labels = "{" + labels if labels else ""
            if name == f"{base}_sum{labels}":
                sums[key] = float(value)
            elif name == f"{base}_count{labels}":
                counts[key] = float(value)
    return {
        f"{key}_mean_ms": round(1000 * sums[key] / counts[key], 2)
        for key in sums
        if counts.get(key)
    }


async def set_up_shops(stack: SystemStack, count: int) -> list[str]:
    """Tenants bench-0.. with WhatsApp numbers +3314500000N and one seller each."""
    numbers = []
    for index in range(count):
        number = f"+3314500{index:04d}"
        await create_shop(stack, f"bench-{index}", f"whatsapp:{number}", [f"+3361200{index:04d}"])
        numbers.append(number)
    return numbers


# Out of every 20 messages: 12 client codes, 4 seller posts, 2 greetings, 1 STOP, 1 START.
_MIX = ["A12"] * 12 + ["SELLER"] * 4 + ["salut"] * 2 + ["STOP", "START"]


def messages(
    run_id: str, account_sid: str, shop_numbers: list[str], clients: int
) -> Iterator[gateway_events.MessageReceived]:
    """The mix above over `clients` distinct client phones per shop (a live sale's audience
    writes again and again, which is what routing's sender cache is for)."""
    for n in range(10**9):
        shop = n % len(shop_numbers)
        kind = _MIX[n % len(_MIX)]
        client = f"+3366{shop:03d}{(n // len(shop_numbers)) % clients:05d}"
        sender = f"+3361200{shop:04d}" if kind == "SELLER" else client
        received = Timestamp()
        received.GetCurrentTime()
        yield gateway_events.MessageReceived(
            message_sid=f"SM{run_id}{n:024x}",
            account_sid=account_sid,
            sender=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=sender),
            recipient=address_pb2.Address(
                channel=address_pb2.CHANNEL_WHATSAPP, value=shop_numbers[shop]
            ),
            body="Robe rouge T38, code A12" if kind == "SELLER" else kind,
            received_at=received,
        )


class RoutedWatcher:
    """Arrival time of each MessageRouted, by MessageSid (core NATS sees stream subjects)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.expected = 0
        self.complete = asyncio.Event()

    async def on_message(self, msg: Msg) -> None:
        sid = events_pb2.MessageRouted.FromString(msg.data).message.message_sid
        self.arrived.setdefault(sid, asyncio.get_running_loop().time())
        if len(self.arrived) >= self.expected:
            self.complete.set()

    def expect(self, count: int) -> None:
        self.arrived.clear()
        self.complete.clear()
        self.expected = count


async def publish(js: JetStreamContext, message: gateway_events.MessageReceived) -> None:
    await jetstream.publish(
        js, INBOUND_SUBJECT, message.SerializeToString(), msg_id=message.message_sid
    )


TARGETS = {"throughput_msgs_per_s": ">= 750", "lag_p99_ms": "<= 50"}


async def measure(args: argparse.Namespace) -> dict[str, object]:
    service_env = {"routing": {"ROUTING_CONCURRENCY": str(args.concurrency)}}
    async with bench_stack(SERVICES, "routing-bench-", service_env=service_env) as (stack, _):
        return await measure_stack(args, stack)


async def measure_stack(args: argparse.Namespace, stack: SystemStack) -> dict[str, object]:
    shops = await set_up_shops(stack, args.tenants)
    nats = await jetstream.connect(stack.nats_url, name="routing-bench")
    js = nats.jetstream()
    watcher = RoutedWatcher()
    subscription = await nats.subscribe(ROUTED_SUBJECT, cb=watcher.on_message)
    source = messages(uuid.uuid4().hex[:8], stack.account_sid, shops, args.clients)
    try:
        # Warm-up: connections, caches, first-call costs.
        watcher.expect(300)
        await asyncio.gather(*(publish(js, next(source)) for _ in range(300)))
        await asyncio.wait_for(watcher.complete.wait(), 120)

        watcher.expect(args.messages)
        batch = [next(source) for _ in range(args.messages)]
        loop = asyncio.get_running_loop()
        started = loop.time()
        for first in range(0, len(batch), 500):
            await asyncio.gather(*(publish(js, m) for m in batch[first : first + 500]))
        await asyncio.wait_for(watcher.complete.wait(), 600)
        throughput = len(batch) / (max(watcher.arrived.values()) - started)

        total = int(args.rate * args.duration)
        watcher.expect(total)
        published_at: dict[str, float] = {}

        async def publish_next(index: int, scheduled: float) -> None:
            message = next(source)
            # From its scheduled time (open loop): a publisher held up counts in the lag too.
            published_at[message.message_sid] = scheduled
            await publish(js, message)

        t0 = loop.time()
        await at_rate(publish_next, args.rate, total)
        achieved = total / (loop.time() - t0)
        await asyncio.wait_for(watcher.complete.wait(), 300)
        lags = [(watcher.arrived[sid] - at) * 1000 for sid, at in published_at.items()]
    finally:
        await subscription.unsubscribe()
        await nats.close()
    figures = {
        "throughput_msgs_per_s": round(throughput, 1),
        "throughput_messages": args.messages,
        "steady_rate_target": args.rate,
        "steady_rate_achieved": round(achieved, 1),
        "steady_messages": total,
        "lag_p50_ms": round(percentile(lags, 50), 1),
        "lag_p99_ms": round(percentile(lags, 99), 1),
        "lag_max_ms": round(max(lags), 1),
        "tenants": args.tenants,
        "clients_per_tenant": args.clients,
        "routing_concurrency": args.concurrency,
        "routing_peak_rss_mb": peak_rss_mb(stack.services["routing"].pid),
        **{f"routing_{key}": value for key, value in routing_breakdown(stack).items()},
    }
    return {"bench": "routing", "figures": figures, "targets": TARGETS}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Routing throughput and lag with real peers.")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4, help="batches routed at once")
    parser.add_argument("--clients", type=int, default=1000, help="distinct clients per shop")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(measure(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
