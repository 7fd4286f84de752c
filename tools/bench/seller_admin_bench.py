"""seller_admin benchmark: ResolveSender and ListSellerPhones against a bare grpc.aio unary echo,
in the same run.

    python -m tools.bench.seller_admin_bench [--callers 50] [--tenants 50] [--sellers 10]
                                             [--rounds 5] [--seconds 3]

Starts (unless DATABASE_URL / NATS_URL point at running ones) an embedded PostgreSQL (durable
settings) and NATS JetStream, then two server processes: the real `python -m
services.seller_admin` (auth + metrics interceptors, PostgreSQL, event relay) and a bare echo
server (`GrpcServer` with the same options and uvloop, no interceptors, raw bytes, no
database). It seeds `--tenants` shops through the API, each with a WhatsApp number and
`--sellers` seller phones (one shop's number is reached through a Messaging Service). One client
process then drives each kind with `--callers` concurrent callers on one channel for `--seconds`
per round, rotating echo, ResolveSender and ListSellerPhones rounds:
- ResolveSender: `service` token; caller i writes to shop i mod tenants, half the calls from a
  seller, half from a client;
- ListSellerPhones: a `staff` token of shop i mod tenants, listing its `--sellers` phones.
Each kind reports the median over rounds of calls/s, p50/p99 latency and server CPU per call.

Prints one JSON line; everything it started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from snapsell.common.v1 import address_pb2
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1.seller_admin_pb2_grpc import SellerAdminServiceStub

from infra.auth import issue_token
from infra.grpc_server import GrpcServer
from tools.devstack import EmbeddedNats, EmbeddedPostgres, free_port

ROOT = Path(__file__).resolve().parents[2]
ECHO_SERVICE = "bench.v1.EchoService"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
ACCOUNT_SID = "AC" + "be" * 16
TARGET_RATIO = 0.4
TARGET_P99_MS = 20.0

Call = Callable[[int], Awaitable[object]]
Metadata = tuple[tuple[str, str], ...]


# --- the echo server (run as `--serve-echo PORT` in its own process) -----------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve_echo(port: int) -> None:
    server = GrpcServer(port, [ECHO_SERVICE], host="127.0.0.1")
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    server.server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": handler}),)
    )
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1.0)


# --- processes ------------------------------------------------------------------------------


class Stack:
    """PostgreSQL, NATS, seller_admin and the echo server; stopped by PID."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {"seller_admin": free_port(), "echo": free_port()}
        self.jwt_secret = secrets.token_urlsafe(32)
        self._stops: list[Callable[[], None]] = []

    def _infra(self) -> tuple[str, str]:
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

    async def start(self) -> None:
        dsn, nats_url = self._infra()
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "NATS_URL": nats_url,
            "SNAPSELL_JWT_SECRET": self.jwt_secret,
            "LOG_LEVEL": "WARNING",
            "GRPC_PORT": str(self.ports["seller_admin"]),
            "METRICS_PORT": str(free_port()),
        }
        self._spawn("seller_admin", [sys.executable, "-m", "services.seller_admin"], env)
        echo = [sys.executable, "-m", "tools.bench.seller_admin_bench", "--serve-echo"]
        self._spawn("echo", [*echo, str(self.ports["echo"])], dict(os.environ))
        for name in self.processes:
            await self._wait_serving(name)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        with (self.state / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def _wait_serving(self, name: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.address(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited; see {self.state / (name + '.log')}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{name} not serving after {timeout_s}s")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()


@contextlib.contextmanager
def state_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="seller-admin-bench-") as tmp:
        yield Path(tmp)


# --- data -----------------------------------------------------------------------------------


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def whatsapp(number: str) -> address_pb2.Address:
    return address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=number)


async def seed(
    stub: SellerAdminServiceStub, admin: Metadata, run_id: str, args: argparse.Namespace
) -> list[tuple[str, str, list[str], str]]:
    """(tenant id, business number, seller numbers, messaging service SID or "") per shop,
    created through the API like any operator would."""
    shops = []
    for shop in range(args.tenants):
        tenant_id = f"bench-{run_id}-{shop}"
        await stub.CreateTenant(
            pb.CreateTenantRequest(tenant_id=tenant_id, display_name=f"Bench {shop}"),
            metadata=admin,
        )
        number = f"+3375{shop:03d}{secrets.randbelow(10_000):04d}"
        service_sid = f"MG{uuid.uuid4().hex}" if shop == 0 else ""
        await stub.AddChannel(
            pb.AddChannelRequest(
                tenant_id=tenant_id,
                address=service_sid or f"whatsapp:{number}",
                account_sid=ACCOUNT_SID,
            ),
            metadata=admin,
        )
        sellers = [f"+3361{shop:03d}{seller:04d}" for seller in range(args.sellers)]
        for seller in sellers:
            await stub.AddSellerPhone(
                pb.AddSellerPhoneRequest(tenant_id=tenant_id, phone_number=seller),
                metadata=admin,
            )
        shops.append((tenant_id, number, sellers, service_sid))
    return shops


# --- load -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(call: Call, callers: int, seconds: float, server_pid: int) -> dict[str, float]:
    """`callers` loops calling back to back for `seconds`: calls/s, latency percentiles, and
    the server process's CPU time per call (a figure other load on the machine barely moves)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def caller(index: int) -> None:
        nonlocal errors
        calls = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await call(index + calls * callers)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            finally:
                calls += 1
            latencies.append(time.perf_counter() - started)

    began, cpu_began = time.perf_counter(), cpu_seconds(server_pid)
    await asyncio.gather(*(caller(i) for i in range(callers)))
    elapsed, cpu = time.perf_counter() - began, cpu_seconds(server_pid) - cpu_began
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "server_cpu_us_per_call": 1e6 * cpu / max(1, len(latencies)),
        "errors": errors,
    }


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}


async def run(args: argparse.Namespace) -> dict[str, object]:
    with state_dir() as state:
        stack = Stack(state)
        try:
            await stack.start()
            return await measure(stack, args)
        finally:
            stack.stop()


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, object]:
    secret = stack.jwt_secret
    admin = bearer(issue_token(secret, sub="bench-admin", role="admin"))
    service = bearer(issue_token(secret, sub="bench-routing", role="service"))
    async with (
        grpc.aio.insecure_channel(stack.address("seller_admin")) as channel,
        grpc.aio.insecure_channel(stack.address("echo")) as echo_channel,
    ):
        stub = SellerAdminServiceStub(channel)
        shops = await seed(stub, admin, uuid.uuid4().hex[:6], args)
        resolves = [
            pb.ResolveSenderRequest(
                recipient=whatsapp(number),
                sender=whatsapp(sellers[0] if variant == 0 else f"+3369{shop:03d}{variant:04d}"),
                account_sid=ACCOUNT_SID,
                messaging_service_sid=service_sid,
            )
            for shop, (_, number, sellers, service_sid) in enumerate(shops)
            for variant in (0, 1)
        ]
        lists = [
            (
                pb.ListSellerPhonesRequest(page_size=args.sellers),
                bearer(issue_token(secret, sub="bench-staff", role="staff", tenant_id=tenant)),
            )
            for tenant, _, _, _ in shops
        ]
        echo = echo_channel.unary_unary(ECHO_METHOD)
        # A request-sized payload: what ResolveSender receives, echoed back.
        payload = resolves[0].SerializeToString()

        async def resolve_call(index: int) -> object:
            return await stub.ResolveSender(resolves[index % len(resolves)], metadata=service)

        async def list_call(index: int) -> object:
            request, metadata = lists[index % len(lists)]
            return await stub.ListSellerPhones(request, metadata=metadata)

        async def echo_call(index: int) -> object:
            return await echo(payload)

        kinds: dict[str, tuple[Call, int]] = {
            "echo": (echo_call, stack.processes["echo"].pid),
            "resolve_sender": (resolve_call, stack.processes["seller_admin"].pid),
            "list_seller_phones": (list_call, stack.processes["seller_admin"].pid),
        }
        for call, pid in kinds.values():  # warm-up: connections, prepared statements, caches
            await drive(call, args.callers, 1.0, pid)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in kinds}
        for number in range(args.rounds):
            for name, (call, pid) in kinds.items():
                rounds[name].append(await drive(call, args.callers, args.seconds, pid))
            print(
                f"round {number + 1}: "
                + ", ".join(
                    f"{name} {r[-1]['rps']:.0f}/s p99 {r[-1]['p99_ms']:.1f} ms"
                    for name, r in rounds.items()
                ),
                file=sys.stderr,
            )
    results = {name: median_of(r) for name, r in rounds.items()}
    echo_rps = results["echo"]["rps"]
    figures: dict[str, float] = {}
    for name, result in results.items():
        figures |= {f"{name}_{key}": value for key, value in result.items()}
    for name in ("resolve_sender", "list_seller_phones"):
        per_round = [
            ours["rps"] / echo["rps"]
            for ours, echo in zip(rounds[name], rounds["echo"], strict=True)
        ]
        figures[f"{name}_vs_echo"] = round(statistics.median(per_round), 3)
    targets = {
        "resolve_sender_vs_echo": f">= {TARGET_RATIO}",
        "list_seller_phones_vs_echo": f">= {TARGET_RATIO}",
        "resolve_sender_p99_ms": f"<= {TARGET_P99_MS}",
        "list_seller_phones_p99_ms": f"<= {TARGET_P99_MS}",
    }
    return {
        "bench": "seller_admin",
        "figures": figures,
        "targets": targets,
        "params": {
            "callers": args.callers,
            "tenants": args.tenants,
            "sellers_per_tenant": args.sellers,
            "rounds": args.rounds,
            "round_s": args.seconds,
            "cpus": os.cpu_count(),
        },
        "notes": [
            f"echo median {echo_rps:.0f} calls/s; ratios are medians of per-round ratios",
            "server_cpu_us_per_call is the server process's CPU time per completed call",
        ],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--sellers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--serve-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if args.serve_echo is not None:
            runner.run(serve_echo(args.serve_echo))
            return 0
        result = runner.run(run(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
