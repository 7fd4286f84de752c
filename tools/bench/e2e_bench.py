"""End-to-end benchmark: signed webhook -> gateway -> routing -> outbox -> Twilio sandbox.

    python -m tools.bench.e2e_bench [--rates 100,300,750,1000] [--seconds 10] [--shops 10]
                                    [--drain-seconds 15] [--log-level INFO]
                                    [--sandbox-latency-ms 150] [--slow-rates 300,750]

The whole system as separate processes (`tools.stack`, as `make run` starts it): embedded
PostgreSQL and NATS JetStream in a temp dir (unless DATABASE_URL / NATS_URL are set; the
services' schemas there are then dropped first, as the tests do), the Twilio sandbox with no
latency and no faults, seller_admin, live_session, routing, outbox and the gateway, configured
as production runs them (deploy/base): `LOG_LEVEL=INFO`, tracing sampled at 10% and exported
over OTLP (to `tools.bench.otlp_sink`; OTLP/HTTP from the gateway, as the prod overlay
has it, OTLP/gRPC from the others), the outbox's default per-sender limit (WhatsApp's 80
messages/s per number). `--shops` shops, each with its own WhatsApp number, are set up with the
operator CLI (`services.seller_admin.cli`), and the webhooks go to them in turn.

Each webhook is a "HELP" from a WhatsApp client that writes only once in the run, so it causes
exactly one outbound message: routing enqueues the help reply (correlation id = the webhook's
MessageSid), the outbox checks consent and sends it, the sandbox accepts it. After a warm-up
(100 webhooks at 50/s, not measured), one phase per rate, lowest first: webhooks posted
open-loop (`tools.bench.open_loop`, keep-alive connections, each request scheduled at
`start + i / rate`) for `--seconds`, then at most `--drain-seconds` for the replies. Routing
does ~250 msg/s on 2 cores, so the higher rates may not finish: what was achieved is reported,
the rest is counted as pending and said in the notes; before the next phase starts, the
backlog is given up to `--settle-seconds` to clear, outside of any measurement. Then the second
scenario: the sandbox answers every send after `--sandbox-latency-ms` (Twilio's API takes
~100-200 ms), and one phase per `--slow-rates`, figures named `slow_rN_...`: the outbox's
in-flight limit (`OUTBOX_MAX_IN_FLIGHT`, `--in-flight`, default the outbox's) then caps the
send rate at about limit / latency.

Latency = the outbox's record of the sandbox's 201 (`outbox.messages.sent_at`, found by the
webhook's MessageSid) - the moment the load generator released the webhook (arithmetic in
`tools.bench.e2e_figures`); the sandbox itself shows its acceptance time to the second only.
The sandbox's count per recipient checks that every reply was accepted at most once.

Figures, per rate N (`rN_`): `webhook_rps` achieved post rate; `send_rps` replies accepted /
(last acceptance - first post); `p50_ms` / `p99_ms` over the replies that arrived;
`enqueued_p50_ms` / `enqueued_p99_ms` the part before the outbox (webhook -> reply enqueued:
gateway, JetStream, routing and its peers); `answer_p99_ms` the gateway's answer time;
`non200` webhooks not answered 200; `pending` replies not sent at the cut; `send_failed`
replies dead or blocked. Then `<service>_peak_rss_mb` over the run (`tools.bench.stats.PeakRss`),
`rN_cpu_ms_per_msg_<process>` (CPU of each service's process tree, PostgreSQL's and NATS's
when embedded, and their `total`, over the phase's load and drain, per reply sent),
`loadgen_cpu_pct` (the load generator at the top rate), `loadgen_lag_p99_ms` (its worst
lateness), `sandbox_duplicates` and `sandbox_check_ok`. `max_sustained_rps` is the highest
rate of the first scenario that was posted at 95% of it or more, all answered 200, and left
nothing pending (no growing backlog), and `max_sustained_p99_ms` its p99; targets: `TARGETS`.
Prints one JSON line last (shape in `tools.bench.__main__`); exit 1 when the stack failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from tools.bench.e2e_figures import (
    WAITING_STATUSES,
    Outbound,
    PhaseSummary,
    check_sandbox,
    summarise_phase,
)
from tools.bench.harness import bench_stack, run_whole_system
from tools.bench.open_loop import OpenLoopResult, run_open_loop
from tools.bench.otlp_sink import GATEWAY_PROTOCOL, PRODUCTION_SAMPLE_RATIO, OtlpSink
from tools.bench.stats import PeakRss, tree_cpu_seconds
from tools.bench.webhooks import (
    BUSINESS_NUMBER,
    WEBHOOK_PATH,
    client_address,
    message_sid,
    new_nonce,
    raw_request,
    shop_number,
    signed_webhooks,
)
from tools.stack import SystemStack

TENANT = "e2e-bench"
KEYWORD = "HELP"
TARGETS = {
    "r300_p99_ms": "<= 100",
    "max_sustained_rps": ">= 750",
    "max_sustained_p99_ms": "<= 250",
    "sandbox_check_ok": "== 1",
}
WARMUP_RATE, WARMUP_SECONDS = 50.0, 2.0
WARMUP_DRAIN_S = 60.0
# Each phase's clients are numbered from `batch * CLIENTS_PER_BATCH`: nobody writes twice.
CLIENTS_PER_BATCH = 1_000_000
ANSWER_TIMEOUT_S = 10.0
POLL_S = 0.25
# Sandbox settings for speed; every key not given keeps its default (no fault of any kind).
SANDBOX_FAST = {"latency_ms": 0, "error_rate": 0, "rate_limit_rate": 0, "auto_callbacks": []}
_OUTBOUND = """
SELECT m.correlation_id, m.status, extract(epoch FROM m.created_at)::float8 AS enqueued,
    extract(epoch FROM m.sent_at)::float8 AS sent,
    extract(epoch FROM (SELECT min(a.started_at) FROM outbox.attempts a
                        WHERE a.message_id = m.id))::float8 AS started
FROM outbox.messages m WHERE left(m.correlation_id, 12) = $1
"""
_FINISHED = """
SELECT count(*) FROM outbox.messages
WHERE left(correlation_id, 12) = $1 AND status <> ALL($2::text[])
"""


def say(line: str) -> None:
    print(f"e2e bench: {line}", file=sys.stderr, flush=True)


class Phases:
    """Drives the load phases against a running stack and keeps what they measured."""

    def __init__(
        self,
        args: argparse.Namespace,
        stack: SystemStack,
        db: asyncpg.Pool,
        infra_pids: dict[str, int],
        *,
        body: str = KEYWORD,
        shops: Sequence[str] = (BUSINESS_NUMBER,),
    ) -> None:
        self.args, self.stack, self.db, self.body = args, stack, db, body
        self.shops = shops  # the numbers webhooks go to, in turn
        # Every process whose CPU a phase accounts for: the services, PostgreSQL, NATS.
        self.cpu_roots = {name: s.pid for name, s in stack.services.items()} | infra_pids
        self.nonce = new_nonce()
        self.clients: dict[str, str] = {}  # MessageSid -> the client's address, whole run
        self.sids: dict[int, list[str]] = {}  # batch -> its MessageSids in posting order
        self.outbound: dict[str, Outbound] = {}  # MessageSid -> its reply, measured phases
        self.figures: dict[str, float] = {}
        self.notes: list[str] = []
        self.lags_ms: list[float] = []  # the load generator's lateness (p99), per phase
        self.loadgen_cpu_pct: list[float] = []  # its CPU, per phase

    def prefix(self, batch: int) -> str:
        """What every MessageSid of one batch starts with (batch and nonce, see webhooks)."""
        return message_sid(batch, self.nonce, 0)[:12]

    async def post(self, batch: int, rate: float, seconds: float) -> OpenLoopResult:
        """Post `rate * seconds` signed webhooks (text `body`) open-loop at `rate` per second."""
        url = self.stack.public_base_url + WEBHOOK_PATH
        first = batch * CLIENTS_PER_BATCH
        webhooks = signed_webhooks(
            url,
            self.stack.account_sid,
            self.stack.auth_token,
            count=round(rate * seconds),
            batch=batch,
            nonce=self.nonce,
            body=self.body,
            first_client=first,
            shops=self.shops,
        )
        sids: list[str] = []
        requests: list[bytes] = []
        for index, webhook in enumerate(webhooks):
            sids.append(webhook.message_sid)
            requests.append(raw_request(url, webhook))
            self.clients[webhook.message_sid] = client_address(first + index)
        self.sids[batch] = sids
        return await run_open_loop(
            "127.0.0.1",
            self.stack.gateway_port,
            sids,
            requests,
            rate=rate,
            connections=self.args.connections,
            drain_timeout_s=ANSWER_TIMEOUT_S,
        )

    async def wait_finished(self, batch: int, expected: int, timeout_s: float) -> int:
        """Wait until `expected` replies of `batch` are final, at most `timeout_s`; how many are."""
        deadline, prefix = time.monotonic() + timeout_s, self.prefix(batch)
        while True:
            done = int(await self.db.fetchval(_FINISHED, prefix, sorted(WAITING_STATUSES)))
            if done >= expected or time.monotonic() >= deadline:
                return done
            await asyncio.sleep(POLL_S)

    async def warm_up(self) -> None:
        """Connections, caches and first-call costs, before anything is measured."""
        result = await self.post(0, WARMUP_RATE, WARMUP_SECONDS)
        ok = sum(1 for status in result.statuses.values() if status == 200)
        done = await self.wait_finished(0, ok, WARMUP_DRAIN_S)
        if ok < result.sent or done < ok:
            self.notes.append(f"warm-up: {ok} of {result.sent} answered 200, {done} replies done")

    async def measure(self, batch: int, rate: float, scenario: str = "") -> PhaseSummary:
        """One phase; its figures are named `<scenario>r<rate>_...`."""
        # The two clocks of a latency: the load generator's (monotonic) and the outbox's (wall).
        wall_minus_monotonic = time.time() - time.monotonic()
        cpu_before = self.cpu_seconds()
        result = await self.post(batch, rate, self.args.seconds)
        answered = sum(1 for status in result.statuses.values() if status == 200)
        await self.wait_finished(batch, answered, self.args.drain_seconds)
        cpu_used = {name: s - cpu_before.get(name, 0.0) for name, s in self.cpu_seconds().items()}
        rows = await self.db.fetch(_OUTBOUND, self.prefix(batch))
        outbound = {
            r["correlation_id"]: Outbound(r["status"], r["enqueued"], r["sent"], r["started"])
            for r in rows
        }
        self.outbound |= outbound
        posted_at = {
            sid: released + wall_minus_monotonic
            for sid, released in zip(self.sids[batch], result.released_at, strict=True)
            if released
        }
        summary = summarise_phase(rate, posted_at, result.statuses, outbound)
        phase = summary.figures(result.achieved_rate, result.percentile(99))
        self.figures |= {scenario + name: value for name, value in phase.items()}
        self.figures |= cpu_figures(f"{scenario}r{rate:g}_", cpu_used, summary.sent)
        self.lags_ms.append(result.release_lag_p99_ms)
        self.loadgen_cpu_pct.append(100 * result.client_cpu_s / (result.send_span_s or 1.0))
        self.notes.extend(f"{rate:g}/s webhooks: {failure}" for failure in result.failures[:3])
        if result.achieved_rate < 0.95 * rate:
            self.notes.append(
                f"{rate:g}/s: webhooks went out at {result.achieved_rate:.0f}/s only: all "
                f"{self.args.connections} connections were waiting for the gateway (answer p99 "
                f"{result.percentile(99):.0f} ms) while the load generator used "
                f"{self.loadgen_cpu_pct[-1]:.0f}% of a core"
            )
        if summary.pending:
            self.notes.append(
                f"{rate:g}/s: the system did not keep up; {summary.pending} of "
                f"{summary.answered_200} replies were not sent {self.args.drain_seconds:g} s "
                f"after the load ended ({summary.unrouted} not routed yet, {summary.queued} "
                f"queued in the outbox); replies went out at {summary.send_rps:.0f}/s; "
                f"p50/p99 are over the {summary.sent} that arrived, so they understate"
            )
        return summary

    def cpu_seconds(self) -> dict[str, float]:
        return {name: tree_cpu_seconds(pid) for name, pid in self.cpu_roots.items()}

    async def settle(self, batch: int, summary: PhaseSummary) -> None:
        """Let a phase's backlog clear so that the next phase starts on an idle system."""
        if not summary.pending:
            return
        say(f"waiting up to {self.args.settle_seconds:g} s for the {summary.pending} pending")
        done = await self.wait_finished(batch, summary.answered_200, self.args.settle_seconds)
        if done < summary.answered_200:
            self.notes.append(
                f"the next phase started with {summary.answered_200 - done} replies of the "
                f"{summary.rate:g}/s phase still pending"
            )

    async def check_sandbox(self) -> None:
        stats = await self.stack.sandbox_control("GET", "stats")
        sent_to = [
            self.clients[sid]
            for sid, row in self.outbound.items()
            if row.sent_at is not None and sid in self.clients
        ]
        check = check_sandbox(stats["accepted_by_to"], self.clients.values(), sent_to)
        self.figures["sandbox_duplicates"] = check.duplicates
        self.figures["sandbox_check_ok"] = int(check.ok)
        if not check.ok:
            self.notes.append(
                f"SANDBOX CHECK FAILED: {check.duplicates} accepted twice, {check.missing} "
                f"marked sent but never accepted, {check.strangers} for unknown recipients"
            )


def cpu_figures(prefix: str, cpu_s: dict[str, float], sent: int) -> dict[str, float]:
    """CPU ms per reply sent, per process and in all, over a phase (load and drain)."""
    per_message = {
        f"{prefix}cpu_ms_per_msg_{name}": round(1000 * seconds / max(1, sent), 3)
        for name, seconds in sorted(cpu_s.items())
    }
    per_message[f"{prefix}cpu_ms_per_msg_total"] = round(
        1000 * sum(cpu_s.values()) / max(1, sent), 3
    )
    return per_message


async def set_up_shops(stack: SystemStack, shops: int) -> None:
    """The shops an operator would create (README): a tenant and its WhatsApp number each."""
    for index in range(shops):
        tenant, number = f"{TENANT}-{index}", f"whatsapp:{shop_number(index)}"
        await stack.operator_cli(
            ("create-tenant", "--tenant", tenant, "--name", f"E2E bench {index}"),
            ("add-channel", "--tenant", tenant, "--address", number),
        )


async def configure_sandbox(stack: SystemStack, latency_ms: float = 0) -> None:
    await stack.sandbox_control("POST", "faults", SANDBOX_FAST | {"latency_ms": latency_ms})


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    say("starting the stack")
    with OtlpSink() as sink:
        env = {"LOG_LEVEL": args.log_level, **sink.env()}
        service_env = {
            "outbox": {"OUTBOX_MAX_IN_FLIGHT": str(args.in_flight)},
            "gateway": sink.env(protocol=GATEWAY_PROTOCOL),
        }
        system = bench_stack(work_dir=workdir, env=env, service_env=service_env)
        async with system as (stack, found):
            async with asyncpg.create_pool(found.dsn, min_size=1, max_size=2) as db:
                shops = [shop_number(i) for i in range(args.shops)]
                phases = Phases(args, stack, db, found.pids, shops=shops)
                await measure_all(args, phases)
    return report(args, phases)


async def measure_all(args: argparse.Namespace, phases: Phases) -> None:
    stack = phases.stack
    peaks = {name: PeakRss(s.pid, interval_s=0.25).start() for name, s in stack.services.items()}
    try:
        await configure_sandbox(stack)
        await set_up_shops(stack, args.shops)
        say("warm-up")
        await phases.warm_up()
        scenarios = [("", rate) for rate in args.rates]
        scenarios += [("slow_", rate) for rate in args.slow_rates]
        for batch, (scenario, rate) in enumerate(scenarios, start=1):
            if scenario and batch == len(args.rates) + 1:
                await configure_sandbox(stack, args.sandbox_latency_ms)
            say(f"{scenario}{rate:g} webhooks/s for {args.seconds:g} s")
            summary = await phases.measure(batch, rate, scenario)
            name = f"{scenario}r{rate:g}"
            say(
                f"{name}: p50 {phases.figures[f'{name}_p50_ms']} ms, "
                f"p99 {phases.figures[f'{name}_p99_ms']} ms, {summary.sent} sent, "
                f"{summary.pending} pending"
            )
            achieved = phases.figures[f"{name}_webhook_rps"]
            if not scenario and summary.sustained(achieved):
                phases.figures["max_sustained_rps"] = rate
                phases.figures["max_sustained_p99_ms"] = phases.figures[f"{name}_p99_ms"]
            if batch < len(scenarios):
                await phases.settle(batch, summary)
        await phases.check_sandbox()
    finally:
        # Sampling stops before the services exit, so their shutdown does not count.
        for name, peak in peaks.items():
            phases.figures[f"{name}_peak_rss_mb"] = round(peak.stop(), 1)
    # The top rate's CPU (phases run lowest rate first) and the worst lateness of any phase.
    phases.figures["loadgen_cpu_pct"] = round(phases.loadgen_cpu_pct[-1], 1)
    phases.figures["loadgen_lag_p99_ms"] = round(max(phases.lags_ms), 2)


def report(args: argparse.Namespace, phases: Phases) -> dict[str, Any]:
    params = {
        "rates_per_s": ",".join(f"{r:g}" for r in args.rates),
        "seconds_per_rate": args.seconds,
        "drain_seconds": args.drain_seconds,
        "connections": args.connections,
        "message": f"{KEYWORD} from a new WhatsApp client each (no sender cache hit) -> 1 reply",
        "shops": f"{args.shops} (operator CLI), webhooks to each in turn",
        "outbox_rate_limit_per_sender": "default (80/s)",
        "sandbox": "no latency, no faults, no status callbacks",
        "slow_sandbox_latency_ms": args.sandbox_latency_ms,
        "slow_rates_per_s": ",".join(f"{r:g}" for r in args.slow_rates),
        "outbox_max_in_flight": args.in_flight,
        "log_level": args.log_level,
        "trace_sample_ratio": PRODUCTION_SAMPLE_RATIO,
        "gateway_trace_protocol": GATEWAY_PROTOCOL,
        "latency": "webhook released -> outbox records the sandbox's 201 (sent_at)",
        "warmup": f"{WARMUP_RATE * WARMUP_SECONDS:g} webhooks at {WARMUP_RATE:g}/s, not measured",
    }
    phases.figures.setdefault("max_sustained_rps", 0)
    return {
        "bench": "e2e",
        "figures": phases.figures,
        "targets": TARGETS,
        "params": params,
        "notes": phases.notes,
    }


def _rates(text: str) -> list[float]:
    return sorted(float(part) for part in text.split(",") if part.strip())


def phases_parser(description: str, settle_s: float, connections: int) -> argparse.ArgumentParser:
    """The options `Phases` reads (`--seconds`, `--drain-seconds`, `--settle-seconds`,
    `--connections`) and `--keep` (`run_whole_system`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=10.0, help="load per phase")
    parser.add_argument("--drain-seconds", type=float, default=15.0, help="reply wait per phase")
    parser.add_argument("--settle-seconds", type=float, default=settle_s, help="backlog wait")
    parser.add_argument(
        "--connections", type=int, default=connections, help="keep-alive connections"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (service logs)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = phases_parser("Webhook -> sandbox send latency, whole system.", 30.0, 64)
    parser.add_argument(
        "--rates",
        type=_rates,
        default=[100.0, 300.0, 750.0, 1000.0],
        help="webhooks/s, comma-separated, run lowest first (default 100,300,750,1000)",
    )
    parser.add_argument("--shops", type=int, default=10, help="shops the load is spread over")
    parser.add_argument("--in-flight", type=int, default=64, help="OUTBOX_MAX_IN_FLIGHT")
    parser.add_argument(
        "--sandbox-latency-ms", type=float, default=150.0, help="second scenario's send latency"
    )
    parser.add_argument(
        "--slow-rates", type=_rates, default=[300.0, 750.0], help="second scenario's rates"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="the services' LOG_LEVEL (default INFO, production's: deploy/base)",
    )
    args = parser.parse_args(argv)
    if not args.rates or min(args.rates + args.slow_rates) <= 0 or args.seconds <= 0:
        parser.error("--rates needs at least one rate, and rates and --seconds must be positive")
    return args


def main(argv: list[str]) -> int:
    return run_whole_system("e2e", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
