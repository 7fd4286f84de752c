"""live_session benchmark: Touch against a bare grpc.aio unary echo, in the same run.

    python -m tools.bench.live_session_bench [--callers 100] [--tenants 50] [--rounds 5]
                                             [--seconds 3]

Starts (unless DATABASE_URL / NATS_URL point at running ones) an embedded PostgreSQL (durable
settings) and NATS JetStream, then two server processes: the real `python -m
services.live_session` (auth + metrics interceptors, PostgreSQL, sweeper, event relay) and a
bare echo server (`GrpcServer` with the same options and uvloop, no interceptors, raw bytes,
no database). One client process drives each with `--callers` concurrent callers on one
channel for `--seconds` per round, alternating echo and Touch rounds; Touch callers spread over
`--tenants` tenants (caller i touches tenant i mod tenants, so every tenant has concurrent
callers). Each kind reports the median over rounds of calls/s and of p50/p99 latency.

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
from snapsell.live_session.v1 import live_session_pb2 as pb
from snapsell.live_session.v1.live_session_pb2_grpc import LiveSessionServiceStub

from infra.auth import issue_token
from infra.grpc_server import GrpcServer
from tools.devstack import EmbeddedNats, EmbeddedPostgres, free_port

ROOT = Path(__file__).resolve().parents[2]
ECHO_SERVICE = "bench.v1.EchoService"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
TARGET_RATIO = 0.4
TARGET_P99_MS = 25.0

Call = Callable[[int], Awaitable[object]]


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
    """PostgreSQL, NATS, live_session and the echo server; stopped by PID."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {"live_session": free_port(), "echo": free_port()}
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
            "GRPC_PORT": str(self.ports["live_session"]),
            "METRICS_PORT": str(free_port()),
        }
        self._spawn("live_session", [sys.executable, "-m", "services.live_session"], env)
        echo = [sys.executable, "-m", "tools.bench.live_session_bench", "--serve-echo"]
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
    with tempfile.TemporaryDirectory(prefix="live-session-bench-") as tmp:
        yield Path(tmp)


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
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await call(index)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
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
    token = issue_token(stack.jwt_secret, sub="bench", role="service")
    metadata = (("authorization", f"Bearer {token}"),)
    run_id = uuid.uuid4().hex[:6]
    requests = [
        pb.TouchRequest(
            tenant_id=f"bench-{run_id}-{i}",
            signal_kind=pb.SIGNAL_KIND_CLIENT_ITEM_CODE,
            correlation_id=f"SM{i:032d}",
        )
        for i in range(args.tenants)
    ]
    async with (
        grpc.aio.insecure_channel(stack.address("live_session")) as touch_channel,
        grpc.aio.insecure_channel(stack.address("echo")) as echo_channel,
    ):
        stub = LiveSessionServiceStub(touch_channel)
        echo = echo_channel.unary_unary(ECHO_METHOD)
        # A reply-sized payload, so both sides move about the same bytes per call.
        payload = b"x" * 140

        async def touch_call(index: int) -> object:
            return await stub.Touch(requests[index % args.tenants], metadata=metadata)

        async def echo_call(index: int) -> object:
            return await echo(payload)

        touch_pid = stack.processes["live_session"].pid
        echo_pid = stack.processes["echo"].pid
        # Warm-up: connections, the sessions themselves, the server's caches.
        await drive(touch_call, args.callers, 1.0, touch_pid)
        await drive(echo_call, args.callers, 1.0, echo_pid)
        touch_rounds, echo_rounds = [], []
        for number in range(args.rounds):
            echo_rounds.append(await drive(echo_call, args.callers, args.seconds, echo_pid))
            touch_rounds.append(await drive(touch_call, args.callers, args.seconds, touch_pid))
            print(
                f"round {number + 1}: echo {echo_rounds[-1]['rps']:.0f}/s, "
                f"touch {touch_rounds[-1]['rps']:.0f}/s p99 {touch_rounds[-1]['p99_ms']:.1f} ms",
                file=sys.stderr,
            )
    touch, echo_result = median_of(touch_rounds), median_of(echo_rounds)
    ratio = round(touch["rps"] / echo_result["rps"], 3)
    return {
        "bench": "live_session",
        "callers": args.callers,
        "tenants": args.tenants,
        "rounds": args.rounds,
        "round_s": args.seconds,
        "cpus": os.cpu_count(),
        "touch": touch,
        "echo": echo_result,
        "touch_vs_echo": ratio,
        "target": {"touch_vs_echo": TARGET_RATIO, "touch_p99_ms": TARGET_P99_MS},
        "meets_target": ratio >= TARGET_RATIO and touch["p99_ms"] <= TARGET_P99_MS,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--tenants", type=int, default=50)
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
