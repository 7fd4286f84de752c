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
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import uvloop
from snapsell.live_session.v1 import live_session_pb2 as pb
from snapsell.live_session.v1.live_session_pb2_grpc import LiveSessionServiceStub

from tools.bench.grpc_stack import ECHO_METHOD, Stack, cpu_seconds, median_of, state_dir

TARGET_RATIO = 0.4
TARGET_P99_MS = 25.0

Call = Callable[[int], Awaitable[object]]


# --- load -----------------------------------------------------------------------------------


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


async def run(args: argparse.Namespace) -> dict[str, object]:
    with state_dir("live-session-bench-") as state:
        stack = Stack("live_session", state)
        try:
            await stack.start()
            return await measure(stack, args)
        finally:
            stack.stop()


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, object]:
    token = stack.keys.token("service", sub="routing", audience="live_session")
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
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
