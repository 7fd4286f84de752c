"""Gateway benchmark: signed Twilio webhooks through the gateway vs a bare Starlette route.

    python -m tools.bench.gateway_bench [--rounds 3] [--seconds 4] [--connections 32 64 128 256]
                                        [--steady-seconds 10] [--workers 2]

Starts an embedded NATS JetStream (state in a temp dir) and up to five servers with the same
uvicorn settings, measured by the same load generators:

- bare: `tools.bench.bare_app` with `--workers` processes (`BARE_WORKERS`) — reads the body,
  answers the empty TwiML: the ceiling of Starlette on uvicorn with as many processes as the
  gateway, that the target ratio (`ratio`) is taken against;
- gateway: `python -m services.gateway` as a pod runs it, `GATEWAY_WORKERS=--workers`
  processes on one port — signature check, protobuf, JetStream publish and PubAck, then the
  same TwiML. Its per-sender spam limit is raised out of the way and every webhook has its own
  sender, so every request does the full work. Tracing off;
- gateway_traced: the same with tracing as production runs it (deploy/base:
  `SNAPSELL_TRACE_SAMPLE_RATIO=0.1`, batched OTLP export to a collector, over OTLP/HTTP as the
  prod overlay's gateway exports, here to `tools.bench.otlp_sink`), for `ratio_traced` against
  the same bare route;
- unless `--workers 1`: gateway_1p and bare_1p, one process each (`ratio_1p`).

Each server is warmed by `wrk -t1 -c256` (3 s); then `--rounds` rounds, each running `wrk -t1
-cN --latency` for `--seconds` against each server in turn, once for every N of
`--connections`, sending signed WhatsApp webhooks (`tools.bench.wrk`) — to a gateway, every run
its own fresh slice of them (its own MessageSids, so no publish is a JetStream duplicate that
NATS acks without storing), sized from the fastest rate seen so far — the order of the
servers reversed every other round. A server's result in
a round is its fastest run of the round, so each is measured at the load that saturates it:
the gateway answers only after JetStream's PubAck, so it needs more requests in flight than the
bare route to keep its cores busy (measured: 64-256), while the bare route is saturated by
32-64 and slows down with more. Rates and latencies are the medians over the rounds of those
results (`<server>_c`: the connections of the median one); a ratio is the median of the
rounds' own ratios, so a slow minute on the machine weighs on both sides of it. Then, the
others stopped, an open-loop steady load on the gateway at half its measured maximum for
`--steady-seconds`, every webhook a fresh MessageSid (`tools.bench.open_loop`): p50/p99/max
from each request's scheduled time. It has `-c` connections (256), one request in flight on
each as Twilio sends them, so that the client never holds a request back for want of a free
connection (with 32, a pause of a few milliseconds at ~5,000/s did, and the wait counted as
the gateway's latency). Peak RSS of each server's process tree is sampled throughout
(`tools.bench.stats.PeakRss`).

Stream check (validity: the gateway must never answer 200 for a message it did not hand over,
and every 200 must have cost a stored message): after the gateways stop, every `Nats-Msg-Id`
of the INBOUND stream is read back. Each wrk run's slice must hold at least as many stored
MessageSids as the run had 200 answers, and at most its requests plus those still in flight
when wrk stopped (`-c`); a run that used up its slice (ids repeated) fails the check. The
steady phase's stored MessageSids must be exactly those answered 200 (a 503'd one may also be
stored: Twilio would retry). `answered_200` and `stream_stored` are the totals.

Prints one JSON line (shape in `tools.bench.__main__`):
    {"bench": "gateway",
     "figures": {"bare_rps", "gateway_rps", "ratio" (gateway/bare, same processes, this run),
                 "gateway_traced_rps", "ratio_traced" (gateway with production tracing/bare),
                 "bare_p50_ms", "bare_p99_ms", "gateway_p50_ms", "gateway_p99_ms" (wrk, max load),
                 "bare_c", "gateway_c" (connections of the median round's fastest run),
                 "ratio_c32", "ratio_c64", ... (gateway/bare, both at N connections),
                 "gateway_non200", "gateway_1p_rps", "bare_1p_rps", "ratio_1p" (one process),
                 "half_rate", "half_rate_achieved", "p50_half_rate_ms",
                 "p99_half_rate_ms", "max_half_rate_ms", "half_rate_non200",
                 "gateway_peak_rss_mb", "bare_peak_rss_mb",
                 "loadgen_cpu_pct", "loadgen_lag_p99_ms" (the steady client's CPU and lateness),
                 "answered_200", "stream_stored", "stream_check_ok" (1 = passed)},
     "targets": {"ratio": ">= 0.5", "ratio_traced": ">= 0.5", "p99_half_rate_ms": "<= 25",
                 "stream_check_ok": "== 1", "gateway_peak_rss_mb": "<= 150",
                 "gateway_traced_peak_rss_mb": "<= 150"}, "params": {...},
     "notes": [...]}
Exit codes: 0 measured (targets met or not), 1 a server or NATS failed, 2 wrk unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import uvloop

from tools.bench.harness import run_in_workdir
from tools.bench.open_loop import OpenLoopResult, run_open_loop
from tools.bench.otlp_sink import GATEWAY_PROTOCOL, PRODUCTION_SAMPLE_RATIO, OtlpSink
from tools.bench.stats import PeakRss
from tools.bench.stream_check import stored_message_ids
from tools.bench.webhooks import (
    WEBHOOK_PATH,
    batch_of,
    new_nonce,
    raw_request,
    signed_webhooks,
)
from tools.bench.wrk import WrkMissingError, WrkResult, ensure_wrk, run_wrk, write_wrk_inputs
from tools.devstack import EmbeddedNats, free_port, nats_service_env
from tools.stack import RunningService, spawn_service

ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "gateway-bench-auth-token"
# MessageSid batches (`webhooks.message_sid`): the bare route's table, the steady phase, then
# one per gateway wrk run.
BARE_BATCH, STEADY_BATCH, FIRST_WRK_BATCH = 0, 1, 2
BARE_BODIES = 20_000
# A gateway run's slice: this many times the fastest rate seen so far, for its length.
SLICE_MARGIN = 1.5
WARMUP_S = 3.0
TARGETS = {
    "ratio": ">= 0.5",
    "ratio_traced": ">= 0.5",
    "p99_half_rate_ms": "<= 25",
    "stream_check_ok": "== 1",
    # A pod as deployed (--workers processes, tracing on), supervisor included.
    "gateway_peak_rss_mb": "<= 150",
    "gateway_traced_peak_rss_mb": "<= 150",
}
# ratio figure -> (gateway, bare route), both with the same number of processes; "ratio" is
# the headline: the gateway as deployed (`--workers` processes) against the bare route's.
RATIOS = {
    "ratio": ("gateway", "bare"),
    "ratio_traced": ("gateway_traced", "bare"),
    "ratio_1p": ("gateway_1p", "bare_1p"),
}
FIGURE_ORDER = (
    "bare_rps",
    "gateway_rps",
    "ratio",
    "gateway_traced_rps",
    "ratio_traced",
    "bare_c",
    "gateway_c",
    "bare_p50_ms",
    "bare_p99_ms",
    "gateway_p50_ms",
    "gateway_p99_ms",
    "gateway_non200",
    "gateway_1p_rps",
    "bare_1p_rps",
    "ratio_1p",
    "half_rate",
    "half_rate_achieved",
    "p50_half_rate_ms",
    "p99_half_rate_ms",
    "max_half_rate_ms",
    "half_rate_non200",
    "gateway_peak_rss_mb",
    "bare_peak_rss_mb",
    "loadgen_cpu_pct",
    "loadgen_lag_p99_ms",
)


def _ms(value: float) -> float:
    return round(value, 2)


def _ratio(pairs: Iterable[tuple[WrkResult, WrkResult]]) -> float:
    """The median of the rounds' own ratios (ours, theirs)."""
    return round(median(ours.ok_rps / theirs.ok_rps for ours, theirs in pairs), 3)


@dataclass
class Contender:
    server: RunningService
    rss: PeakRss
    rounds: list[dict[int, WrkResult]] = field(default_factory=list)  # connections -> run

    @property
    def fastest_connections(self) -> list[int]:
        """The connections of each round's fastest run."""
        return [max(runs, key=lambda c: runs[c].ok_rps) for runs in self.rounds]

    @property
    def fastest(self) -> list[WrkResult]:
        """Each round's fastest run."""
        return [runs[c] for runs, c in zip(self.rounds, self.fastest_connections, strict=True)]

    def at(self, connections: int) -> list[WrkResult]:
        """Each round's run at `connections`."""
        return [runs[connections] for runs in self.rounds]


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, nats_url: str) -> None:
        self.args, self.workdir, self.nats_url = args, workdir, nats_url
        self.gateway_port = free_port()
        self.public_base = f"http://127.0.0.1:{self.gateway_port}"
        self.nonce = new_nonce()
        self.figures: dict[str, float] = {}
        self.notes: list[str] = []
        self.contenders: dict[str, Contender] = {}  # running servers, by figure prefix
        # The gateways' wrk runs, for the stream check: (batch, slice size, connections, result).
        self.wrk_runs: list[tuple[int, int, int, WrkResult]] = []
        self.fastest_rps = 0.0
        self.signed = 0  # webhooks signed so far: each slice has its own senders too
        self.steady: OpenLoopResult | None = None
        self.bare_table = self._write_slice(BARE_BATCH, BARE_BODIES, "bare")

    def _write_slice(self, batch: int, count: int, name: str = "gateway") -> tuple[Path, Path]:
        webhooks = signed_webhooks(
            self.public_base + WEBHOOK_PATH,
            ACCOUNT_SID,
            AUTH_TOKEN,
            count=count,
            batch=batch,
            nonce=self.nonce,
            first_client=self.signed,
        )
        self.signed += count
        return write_wrk_inputs(self.workdir, webhooks, name)

    def wrk(self, name: str, seconds: float, connections: int | None = None) -> WrkResult:
        """One wrk run against a contender; a gateway gets a fresh slice of webhooks."""
        url = f"http://127.0.0.1:{self.contenders[name].server.port}{WEBHOOK_PATH}"
        connections = connections or self.args.c
        gateway = name.startswith("gateway")
        if gateway:
            batch = FIRST_WRK_BATCH + len(self.wrk_runs)
            size = round(SLICE_MARGIN * self.fastest_rps * seconds) + connections
            script, table = self._write_slice(batch, size)
        else:
            script, table = self.bare_table
        result = run_wrk(url, script, table, seconds=seconds, connections=connections)
        self.fastest_rps = max(self.fastest_rps, result.ok_rps)
        if gateway:
            self.wrk_runs.append((batch, size, connections, result))
        return result

    def start_servers(self, sink: OtlpSink) -> None:
        """Every contender up and warmed before the first measured round (the bare routes
        first: their rate sizes the gateways' first slices)."""
        workers = self.args.workers
        self._start("bare", "tools.bench.bare_app", {"BARE_WORKERS": str(workers)})
        if workers != 1:
            self._start("bare_1p", "tools.bench.bare_app", {"BARE_WORKERS": "1"})
        self._start("gateway", self.args.gateway_module, self._gateway_env(workers))
        traced = self._gateway_env(workers) | sink.env(protocol=GATEWAY_PROTOCOL)
        self._start("gateway_traced", self.args.gateway_module, traced)
        if workers != 1:
            self._start("gateway_1p", self.args.gateway_module, self._gateway_env(1))
        for name in self.contenders:
            self.wrk(name, WARMUP_S)

    def _gateway_env(self, workers: int) -> dict[str, str]:
        # Every gateway validates signatures against the same public URL, as behind a proxy.
        return {
            "NATS_URL": self.nats_url,
            # As deployed: its own NATS user (publish permission checked on every message).
            **nats_service_env(self.nats_url, "gateway"),
            "PUBLIC_BASE_URL": self.public_base,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "GATEWAY_SENDER_MESSAGES_PER_MINUTE": "1000000",
            "GATEWAY_WORKERS": str(workers),
            "METRICS_PORT": str(free_port()),
        }

    def _start(self, name: str, module: str, env: dict[str, str]) -> None:
        port = self.gateway_port if name == "gateway" else free_port()
        server = spawn_service(name, env, port=port, http=True, module=module, log_dir=self.workdir)
        asyncio.run(server.wait_ready())
        self.contenders[name] = Contender(server, PeakRss(server.pid).start())

    def measure_rounds(self) -> None:
        """`--rounds` rounds, each one wrk run per contender and connection count, the order
        of contenders reversed every other round (and every other bench run), so drift on the
        machine hits them all alike; a contender's result in a round is its fastest run."""
        names = list(self.contenders)
        for number in range(self.args.rounds):
            flip = (number + int(os.environ.get("SNAPSELL_BENCH_RUN", "1"))) % 2 == 0
            for name in reversed(names) if flip else names:
                seconds = self.args.seconds
                by_c = {c: self.wrk(name, seconds, c) for c in self.args.connections}
                self.contenders[name].rounds.append(by_c)
        for name, contender in self.contenders.items():
            runs = contender.fastest
            self.figures[f"{name}_rps"] = round(median(r.ok_rps for r in runs), 1)
            middle = sorted(range(len(runs)), key=lambda i: runs[i].ok_rps)[len(runs) // 2]
            self.figures[f"{name}_c"] = contender.fastest_connections[middle]
            self.figures[f"{name}_p50_ms"] = _ms(median(r.p50_ms for r in runs))
            self.figures[f"{name}_p99_ms"] = _ms(median(r.p99_ms for r in runs))
            self.figures[f"{name}_non200"] = sum(r.status_errors for r in runs)
            if errors := sum(r.socket_errors for r in runs):
                self.notes.append(f"{name} at max load: {errors} socket errors")
        for ratio, (ours, bare) in RATIOS.items():
            if ours in self.contenders and bare in self.contenders:
                ours_runs, bare_runs = self.contenders[ours].fastest, self.contenders[bare].fastest
                self.figures[ratio] = _ratio(zip(ours_runs, bare_runs, strict=True))
        # The headline ratio at each load alike too: both servers at N connections.
        gateway, bare_route = self.contenders["gateway"], self.contenders["bare"]
        for c in self.args.connections:
            self.figures[f"ratio_c{c}"] = _ratio(zip(gateway.at(c), bare_route.at(c), strict=True))

    def measure_steady(self) -> None:
        """The gateway alone (the others stopped): an open-loop load at half its maximum."""
        for name in [n for n in self.contenders if n != "gateway"]:
            self._stop(name)
        rate = self.figures["gateway_rps"] / 2
        # uvloop keeps the client's own CPU per request small (it shares the machine).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            self.steady = runner.run(self._steady_load(rate))
        self._stop("gateway")

    def stop_servers(self) -> None:
        for name in list(self.contenders):
            self._stop(name)

    def _stop(self, name: str) -> None:
        contender = self.contenders.pop(name)
        self.figures[f"{name}_peak_rss_mb"] = round(contender.rss.stop(), 1)
        contender.server.stop()

    async def _steady_load(self, rate: float) -> OpenLoopResult:
        count = max(1, round(rate * self.args.steady_seconds))
        url = self.public_base + WEBHOOK_PATH
        webhooks = list(
            signed_webhooks(
                url, ACCOUNT_SID, AUTH_TOKEN, count=count, batch=STEADY_BATCH, nonce=self.nonce
            )
        )
        sids = [w.message_sid for w in webhooks]
        requests = [raw_request(url, w) for w in webhooks]
        del webhooks
        result = await run_open_loop(
            "127.0.0.1", self.gateway_port, sids, requests, rate=rate, connections=self.args.c
        )
        statuses = Counter(result.statuses.values())
        self.figures["half_rate"] = round(rate, 1)
        self.figures["half_rate_achieved"] = round(result.achieved_rate, 1)
        self.figures["p50_half_rate_ms"] = _ms(result.percentile(50))
        self.figures["p99_half_rate_ms"] = _ms(result.percentile(99))
        self.figures["max_half_rate_ms"] = _ms(max(result.latencies_ms, default=0.0))
        self.figures["half_rate_non200"] = result.sent - statuses[200]
        span = result.send_span_s or 1.0
        self.figures["loadgen_cpu_pct"] = round(100 * result.client_cpu_s / span, 1)
        self.figures["loadgen_lag_p99_ms"] = _ms(result.release_lag_p99_ms)
        self.notes.extend(f"steady load: {failure}" for failure in result.failures[:3])
        return result

    def check_stream(self) -> None:
        """Compare what the INBOUND stream holds with what was answered 200 (see docstring)."""
        ids = asyncio.run(stored_message_ids(self.nats_url, "INBOUND", "gateway.v1.>"))
        counts = Counter(ids)
        duplicates = sum(n - 1 for n in counts.values())
        by_batch = Counter(batch_of(sid) if sid else None for sid in counts)
        problems = [f"{duplicates} stored twice"] if duplicates else []
        runs = {batch: (size, c, result) for batch, size, c, result in self.wrk_runs}
        if by_batch.keys() - {STEADY_BATCH, *runs}:
            problems.append("messages from outside this run")
        answered_200 = 0
        for batch, (size, c, result) in runs.items():
            answered_200 += result.ok_answers
            if result.requests > size:
                problems.append(f"run {batch}: {result.requests} requests used up {size} ids")
            elif not result.ok_answers <= by_batch[batch] <= result.requests + c:
                problems.append(
                    f"run {batch}: {by_batch[batch]} stored, {result.ok_answers} answered 200, "
                    f"{result.requests} answered"
                )
        steady_stored = {sid for sid in counts if sid and batch_of(sid) == STEADY_BATCH}
        assert self.steady is not None
        steady_200 = {sid for sid, status in self.steady.statuses.items() if status == 200}
        not_200 = set(self.steady.statuses) - steady_200
        if steady_200 - steady_stored:
            problems.append(f"{len(steady_200 - steady_stored)} answered 200 but not stored")
        unexplained = steady_stored - steady_200 - not_200
        if unexplained and not self.steady.failures:
            problems.append(f"{len(unexplained)} stored without an answer")
        answered_200 += len(steady_200)
        self.figures["answered_200"] = answered_200
        self.figures["stream_stored"] = len(ids)
        self.figures["stream_check_ok"] = 0 if problems else 1
        if problems:
            self.notes.append("STREAM CHECK FAILED: " + "; ".join(problems[:5]))
        elif len(ids) > answered_200:
            self.notes.append(
                f"{len(ids) - answered_200} stored without a 200 read by the client: "
                "requests in flight when wrk stopped, or answered 503 (allowed: Twilio retries)"
            )

    def report(self) -> dict[str, Any]:
        f = self.figures
        figures = {k: f[k] for k in FIGURE_ORDER if k in f} | f
        params: dict[str, Any] = {"wrk": "-t1", "connections": self.args.connections}
        params |= {"steady_connections": self.args.c, "rounds": self.args.rounds}
        params["seconds_per_round"] = self.args.seconds
        params |= {"steady_seconds": self.args.steady_seconds}
        params["traced_sample_ratio"] = PRODUCTION_SAMPLE_RATIO
        params["traced_protocol"] = GATEWAY_PROTOCOL
        params["gateway_module"] = self.args.gateway_module
        params["gateway_workers"] = self.args.workers
        return {
            "bench": "gateway",
            "figures": figures,
            "targets": TARGETS,
            "params": params,
            "notes": self.notes,
        }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gateway vs bare Starlette under signed webhooks.")
    parser.add_argument("--rounds", type=int, default=3, help="measured wrk runs per server")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one wrk run")
    parser.add_argument("--steady-seconds", type=float, default=10.0, help="half-rate run length")
    parser.add_argument(
        "--connections",
        type=int,
        nargs="+",
        default=[32, 64, 128, 256],
        help="wrk connection counts tried per server and round (its fastest run counts)",
    )
    parser.add_argument("-c", type=int, default=256, help="connections (warm-up, steady load)")
    parser.add_argument(
        "--workers", type=int, default=2, help="gateway processes (GATEWAY_WORKERS), default 2"
    )
    parser.add_argument("--gateway-module", default="services.gateway", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    nats = EmbeddedNats(workdir / "nats")
    try:
        bench = Bench(args, workdir, nats.start())
        try:
            with OtlpSink() as sink:
                bench.start_servers(sink)
                bench.measure_rounds()
                bench.measure_steady()
                bench.figures["traced_exports"] = sink.count
        finally:
            bench.stop_servers()
        bench.check_stream()
    finally:
        nats.stop()
    return bench.report()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        ensure_wrk()
    except WrkMissingError as exc:
        print(f"gateway bench: {exc}", file=sys.stderr)
        return 2
    return run_in_workdir("gateway", args.keep, lambda workdir: measure(args, workdir))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
