"""seller_admin benchmark: ResolveSender and ListSellerPhones against a bare grpc.aio unary echo,
in the same run.

    python -m tools.bench.seller_admin_bench [--callers 50] [--tenants 50] [--sellers 10]
                                             [--rounds 5] [--seconds 3] [--rate 750]

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
Each round measures calls/s and server CPU per call with those closed-loop callers, then p50/p99
latency from an open loop at `--rate` calls/s (default 750, the e2e target;
`tools.bench.harness.open_loop`); each kind reports the median over rounds.

Prints one JSON line; everything it started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import uuid

import grpc
from snapsell.common.v1 import address_pb2
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1.seller_admin_pb2_grpc import SellerAdminServiceStub

from tools.bench.harness import (
    Call,
    bearer,
    bench_stack,
    create_shop,
    echo_caller,
    kinds_figures,
    measure_rounds,
    print_report,
    rounds_parser,
)
from tools.stack import SystemStack

AUDIENCE = "seller_admin"
TARGET_RATIO = 0.4
TARGET_P99_MS = 20.0


def whatsapp(number: str) -> address_pb2.Address:
    return address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=number)


async def seed(
    stack: SystemStack, run_id: str, args: argparse.Namespace
) -> list[tuple[str, str, list[str], str]]:
    """(tenant id, business number, seller numbers, messaging service SID or "") per shop,
    created through the API like any operator would."""
    shops = []
    for shop in range(args.tenants):
        tenant_id = f"bench-{run_id}-{shop}"
        number = f"+3375{shop:03d}{secrets.randbelow(10_000):04d}"
        service_sid = f"MG{uuid.uuid4().hex}" if shop == 0 else ""
        sellers = [f"+3361{shop:03d}{seller:04d}" for seller in range(args.sellers)]
        await create_shop(stack, tenant_id, service_sid or f"whatsapp:{number}", sellers)
        shops.append((tenant_id, number, sellers, service_sid))
    return shops


async def run(args: argparse.Namespace) -> dict[str, object]:
    async with bench_stack(["seller_admin"], "seller-admin-bench-", echo=True) as (stack, _):
        return await measure(stack, args)


async def measure(stack: SystemStack, args: argparse.Namespace) -> dict[str, object]:
    keys = stack.keys
    service = bearer(keys.token("service", sub="routing", audience=AUDIENCE))
    async with grpc.aio.insecure_channel(stack.address("seller_admin")) as channel:
        stub = SellerAdminServiceStub(channel)
        shops = await seed(stack, uuid.uuid4().hex[:6], args)
        resolves = [
            pb.ResolveSenderRequest(
                recipient=whatsapp(number),
                sender=whatsapp(sellers[0] if variant == 0 else f"+3369{shop:03d}{variant:04d}"),
                account_sid=stack.account_sid,
                messaging_service_sid=service_sid,
            )
            for shop, (_, number, sellers, service_sid) in enumerate(shops)
            for variant in (0, 1)
        ]
        lists = [
            (
                pb.ListSellerPhonesRequest(page_size=args.sellers),
                bearer(keys.token("staff", tenant, "bench-staff", audience=AUDIENCE)),
            )
            for tenant, _, _, _ in shops
        ]

        async def resolve_call(index: int) -> object:
            return await stub.ResolveSender(resolves[index % len(resolves)], metadata=service)

        async def list_call(index: int) -> object:
            request, metadata = lists[index % len(lists)]
            return await stub.ListSellerPhones(request, metadata=metadata)

        # A request-sized payload: what ResolveSender receives, echoed back.
        async with echo_caller(stack, resolves[0].SerializeToString()) as echo:
            kinds: dict[str, tuple[Call, int]] = {
                "echo": echo,
                "resolve_sender": (resolve_call, stack.services["seller_admin"].pid),
                "list_seller_phones": (list_call, stack.services["seller_admin"].pid),
            }
            rounds = await measure_rounds(kinds, args.callers, args.rounds, args.seconds, args.rate)
    figures = kinds_figures(rounds)
    echo_rps = figures["echo_rps"]
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
    parser = rounds_parser(__doc__, callers=50)
    parser.add_argument("--sellers", type=int, default=10)
    return print_report(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
