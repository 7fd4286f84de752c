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
import os
import sys
import uuid

import grpc
from snapsell.live_session.v1 import live_session_pb2 as pb
from snapsell.live_session.v1.live_session_pb2_grpc import LiveSessionServiceStub

from tools.bench.harness import (
    bearer,
    bench_stack,
    echo_caller,
    measure_rounds,
    print_report,
    rounds_parser,
)
from tools.bench.stats import median_of
from tools.stack import SystemStack

TARGET_RATIO = 0.4
TARGET_P99_MS = 25.0


async def run(args: argparse.Namespace) -> dict[str, object]:
    async with bench_stack(["live_session"], "live-session-bench-", echo=True) as (stack, _):
        return await measure(stack, args)


async def measure(stack: SystemStack, args: argparse.Namespace) -> dict[str, object]:
    metadata = bearer(stack.keys.token("service", sub="routing", audience="live_session"))
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
        # A reply-sized payload, so both sides move about the same bytes per call.
        echo_caller(stack, b"x" * 140) as echo,
    ):
        stub = LiveSessionServiceStub(touch_channel)

        async def touch_call(index: int) -> object:
            # Caller i always touches tenant i mod tenants.
            request = requests[index % args.callers % args.tenants]
            return await stub.Touch(request, metadata=metadata)

        kinds = {
            "echo": echo,
            "touch": (touch_call, stack.services["live_session"].pid),
        }
        rounds = await measure_rounds(kinds, args.callers, args.rounds, args.seconds)
    touch_rounds, echo_rounds = rounds["touch"], rounds["echo"]
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
    parser = rounds_parser(__doc__, callers=100)
    return print_report(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
