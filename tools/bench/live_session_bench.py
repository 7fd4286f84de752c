"""live_session benchmark: Touch against a bare grpc.aio unary echo, in the same run.

    python -m tools.bench.live_session_bench [--callers 100] [--tenants 50] [--rounds 5]
                                             [--seconds 3] [--rate 750]

Starts (unless DATABASE_URL / NATS_URL point at running ones) an embedded PostgreSQL (durable
settings) and NATS JetStream, then two server processes: the real `python -m
services.live_session` (auth + metrics interceptors, PostgreSQL, sweeper, event relay) and a
bare echo server (`GrpcServer` with the same options and uvloop, no interceptors, raw bytes,
no database). One client process drives each with `--callers` concurrent callers on one
channel for `--seconds` per round (calls/s, server CPU per call), then an open loop at `--rate`
calls/s (default 750, the e2e target: one Touch per routed message) for p50/p99 latency
(`tools.bench.harness.open_loop`), alternating echo and Touch rounds; Touches spread over
`--tenants` tenants (call i touches tenant i mod tenants). Each kind reports the median over
rounds; targets: `TARGET_RATIO`, `TARGET_P99_MS`.

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
    kinds_figures,
    measure_rounds,
    print_report,
    rounds_parser,
)
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
            request = requests[index % args.tenants]
            return await stub.Touch(request, metadata=metadata)

        kinds = {
            "echo": echo,
            "touch": (touch_call, stack.services["live_session"].pid),
        }
        rounds = await measure_rounds(kinds, args.callers, args.rounds, args.seconds, args.rate)
    figures = kinds_figures({"touch": rounds["touch"], "echo": rounds["echo"]})
    figures["touch_vs_echo"] = round(figures["touch_rps"] / figures["echo_rps"], 3)
    return {
        "bench": "live_session",
        "figures": figures,
        "targets": {"touch_vs_echo": f">= {TARGET_RATIO}", "touch_p99_ms": f"<= {TARGET_P99_MS}"},
        "params": {
            "callers": args.callers,
            "tenants": args.tenants,
            "rounds": args.rounds,
            "round_s": args.seconds,
            "open_loop_rate": args.rate,
            "cpus": os.cpu_count(),
        },
    }


def main(argv: list[str]) -> int:
    parser = rounds_parser(__doc__, callers=100)
    return print_report(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
