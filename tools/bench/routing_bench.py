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
2. Lag: a steady `--rate` messages/s for `--duration` s; p50/p99/max publish -> MessageRouted.

Prints one JSON line. Everything it started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.routing.v1 import events_pb2
from snapsell.seller_admin.v1 import seller_admin_pb2, seller_admin_pb2_grpc

from infra import jetstream
from tools.dev_keys import DevKeys
from tools.devstack import EmbeddedNats, EmbeddedPostgres, free_port
from tools.twilio_sandbox.process import start_sandbox

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT_SID = "AC" + "2" * 32
AUTH_TOKEN = "routing-bench-sandbox-token"
PEERS = ("seller_admin", "live_session", "outbox", "routing")
INBOUND_SUBJECT = "gateway.v1.message.received"
ROUTED_SUBJECT = "routing.v1.message.routed"


class Stack:
    """PostgreSQL, NATS, the sandbox and the four services; stopped by PID."""

    def __init__(self, state: Path, routing_concurrency: int) -> None:
        self.state = state
        self.concurrency = routing_concurrency
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {name: free_port() for name in PEERS}
        self.metrics_ports = {name: free_port() for name in PEERS}
        self.keys = DevKeys(state / "keys")
        self._stops: list[Callable[[], object]] = []

    def start_infra(self) -> tuple[str, str]:
        dsn, url = os.environ.get("DATABASE_URL"), os.environ.get("NATS_URL")
        if not dsn:
            postgres = EmbeddedPostgres(self.state / "postgres")
            dsn = postgres.start()
            self._stops.append(postgres.destroy)
        if not url:
            nats = EmbeddedNats(self.state / "nats")
            url = nats.start()
            self._stops.append(nats.stop)
        return dsn, url

    async def start(self) -> str:
        dsn, nats_url = self.start_infra()
        sandbox = start_sandbox({ACCOUNT_SID: AUTH_TOKEN})
        self._stops.append(sandbox.stop)
        addr = {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}
        base = {**os.environ, "DATABASE_URL": dsn, "NATS_URL": nats_url, "LOG_LEVEL": "WARNING"}
        extra = {
            "routing": {
                "SELLER_ADMIN_ADDR": addr["seller_admin"],
                "LIVE_SESSION_ADDR": addr["live_session"],
                "OUTBOX_ADDR": addr["outbox"],
                "ROUTING_CONCURRENCY": str(self.concurrency),
            },
            "outbox": {
                "ROUTING_ADDR": addr["routing"],
                "SELLER_ADMIN_ADDR": addr["seller_admin"],
                "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "TWILIO_API_BASE_URL": sandbox.url,
                "PUBLIC_BASE_URL": "http://127.0.0.1:9",
            },
        }
        for name in PEERS:
            env = {
                **base,
                **extra.get(name, {}),
                "GRPC_PORT": str(self.ports[name]),
                "METRICS_PORT": str(self.metrics_ports[name]),
            }
            self.processes[name] = self._spawn(name, env | self.keys.env(name))
        for name in PEERS:
            await self._wait_serving(name)
        return nats_url

    def _spawn(self, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.state / f"{name}.log").open("wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def _wait_serving(self, name: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.ports[name]}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited; see {self.state / (name + '.log')}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    check = stub.Check  # type: ignore[attr-defined]  # HealthStub's stubs list no RPC
                    reply: health_pb2.HealthCheckResponse = await check(
                        health_pb2.HealthCheckRequest(), timeout=1.0
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{name} not serving after {timeout_s}s")

    def peak_rss_mb(self, name: str) -> float | None:
        try:
            status = Path(f"/proc/{self.processes[name].pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None

    def routing_breakdown(self) -> dict[str, float]:
        """Mean time to route a batch and mean peer-call latencies from routing's /metrics
        (ms)."""
        url = f"http://127.0.0.1:{self.metrics_ports['routing']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            for metric, key in (
                ("snapsell_routing_inbound_handling_seconds", "batch_handling"),
                ('snapsell_routing_peer_call_seconds{code="OK",method="ResolveSender"}', "resolve"),
                ('snapsell_routing_peer_call_seconds{code="OK",method="Touch"}', "touch"),
                ('snapsell_routing_peer_call_seconds{code="OK",method="EnqueueMany"}', "enqueue"),
            ):
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

    def stop(self) -> None:
        for name in reversed(PEERS):
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for stop in reversed(self._stops):
            stop()

    async def set_up_shops(self, count: int, admin_token: str) -> list[str]:
        """Tenants bench-0.. with WhatsApp numbers +3314500000N and one seller each."""
        metadata = (("authorization", f"Bearer {admin_token}"),)
        numbers = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.ports['seller_admin']}") as ch:
            stub = seller_admin_pb2_grpc.SellerAdminServiceStub(ch)
            for index in range(count):
                tenant, number = f"bench-{index}", f"+3314500{index:04d}"
                await stub.CreateTenant(
                    seller_admin_pb2.CreateTenantRequest(tenant_id=tenant, display_name=tenant),
                    metadata=metadata,
                )
                await stub.AddChannel(
                    seller_admin_pb2.AddChannelRequest(
                        tenant_id=tenant, address=f"whatsapp:{number}", account_sid=ACCOUNT_SID
                    ),
                    metadata=metadata,
                )
                await stub.AddSellerPhone(
                    seller_admin_pb2.AddSellerPhoneRequest(
                        tenant_id=tenant, phone_number=f"+3361200{index:04d}"
                    ),
                    metadata=metadata,
                )
                numbers.append(number)
        return numbers


# Out of every 20 messages: 12 client codes, 4 seller posts, 2 greetings, 1 STOP, 1 START.
_MIX = ["A12"] * 12 + ["SELLER"] * 4 + ["salut"] * 2 + ["STOP", "START"]


def messages(
    run_id: str, shop_numbers: list[str], clients: int
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
            account_sid=ACCOUNT_SID,
            sender=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=sender),
            recipient=address_pb2.Address(
                channel=address_pb2.CHANNEL_WHATSAPP, value=shop_numbers[shop]
            ),
            body="Robe rouge T38, code A12" if kind == "SELLER" else kind,
            received_at=received,
        )


def percentile(sorted_values: list[float], pct: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


class RoutedWatcher:
    """Arrival time of each MessageRouted, by MessageSid (core NATS sees stream subjects)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.expected = 0
        self.complete = asyncio.Event()

    async def on_message(self, msg: Msg) -> None:
        sid = events_pb2.MessageRouted.FromString(msg.data).message.message_sid
        self.arrived.setdefault(sid, time.perf_counter())
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


async def measure(args: argparse.Namespace, stack: Stack) -> dict[str, object]:
    nats_url = await stack.start()
    admin = stack.keys.token("admin", sub="bench", audience="seller_admin")
    shops = await stack.set_up_shops(args.tenants, admin)
    nats = await jetstream.connect(nats_url, name="routing-bench")
    js = nats.jetstream()
    watcher = RoutedWatcher()
    subscription = await nats.subscribe(ROUTED_SUBJECT, cb=watcher.on_message)
    source = messages(uuid.uuid4().hex[:8], shops, args.clients)
    try:
        # Warm-up: connections, caches, first-call costs.
        watcher.expect(300)
        await asyncio.gather(*(publish(js, next(source)) for _ in range(300)))
        await asyncio.wait_for(watcher.complete.wait(), 120)

        watcher.expect(args.messages)
        batch = [next(source) for _ in range(args.messages)]
        started = time.perf_counter()
        for first in range(0, len(batch), 500):
            await asyncio.gather(*(publish(js, m) for m in batch[first : first + 500]))
        await asyncio.wait_for(watcher.complete.wait(), 600)
        throughput = len(batch) / (max(watcher.arrived.values()) - started)

        total = int(args.rate * args.duration)
        watcher.expect(total)
        published_at: dict[str, float] = {}
        pending = []
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            message = next(source)
            published_at[message.message_sid] = time.perf_counter()
            pending.append(asyncio.create_task(publish(js, message)))
        await asyncio.gather(*pending)
        achieved = total / (time.perf_counter() - t0)
        await asyncio.wait_for(watcher.complete.wait(), 300)
        lags = sorted((watcher.arrived[sid] - at) * 1000 for sid, at in published_at.items())
    finally:
        await subscription.unsubscribe()
        await nats.close()
    return {
        "bench": "routing",
        "throughput_msgs_per_s": round(throughput, 1),
        "throughput_messages": args.messages,
        "steady_rate_target": args.rate,
        "steady_rate_achieved": round(achieved, 1),
        "steady_messages": total,
        "lag_p50_ms": round(percentile(lags, 50), 1),
        "lag_p99_ms": round(percentile(lags, 99), 1),
        "lag_max_ms": round(lags[-1], 1),
        "tenants": args.tenants,
        "clients_per_tenant": args.clients,
        "routing_concurrency": args.concurrency,
        "routing_peak_rss_mb": stack.peak_rss_mb("routing"),
        **{f"routing_{key}": value for key, value in stack.routing_breakdown().items()},
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Routing throughput and lag with real peers.")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4, help="batches routed at once")
    parser.add_argument("--clients", type=int, default=1000, help="distinct clients per shop")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="routing-bench-"))
    stack = Stack(workdir, args.concurrency)
    try:
        result = asyncio.run(measure(args, stack))
    finally:
        stack.stop()
    shutil.rmtree(workdir, ignore_errors=True)  # kept when the run failed: its logs are there
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
