"""Gateway benchmark: signed Twilio webhooks through the gateway vs a bare Starlette route.

    python -m tools.bench.gateway_bench [--seconds 10] [--bodies 20000] [--steady-seconds 10]
                                        [--workers 2]

Starts an embedded NATS JetStream (state in a temp dir), then measures the servers with the
same uvicorn settings and the same load generators, one after the other (the order alternates
with the runner's run number, `SNAPSELL_BENCH_RUN`, so none always goes first):

- bare: `tools.bench.bare_app` — one process; reads the body, answers the empty TwiML;
- gateway: `python -m services.gateway` as a pod runs it, `GATEWAY_WORKERS=--workers`
  processes on one port — signature check, protobuf, JetStream publish and PubAck, then the
  same TwiML. Its per-sender spam limit is raised out of the way and every webhook has its own
  sender, so every request does the full work;
- gateway_1p: the same with one process (wrk phases only), shown as `ratio_1p`.

Phases, per server: `wrk -t1 -c32` warm-up (3 s), then `wrk -t1 -c32 --latency` for `--seconds`
cycling through `--bodies` distinct signed WhatsApp webhooks (`tools.bench.wrk`): maximum rate
(200 answers/s) and p50/p99 at that load. For the gateway only, then: an open-loop steady load
at half its measured maximum for `--steady-seconds`, every webhook a fresh MessageSid
(`tools.bench.open_loop`): p50/p99/max from each request's scheduled time. Peak RSS of each
server's process tree is sampled throughout (`tools.bench.rss`).

Stream check (the gateway must never answer 200 for a message it did not hand over): after
the gateway stops, every `Nats-Msg-Id` of the INBOUND stream is read back. The wrk phases
repeat their bodies, so JetStream's de-duplication must leave each of the `--bodies`
MessageSids stored exactly once; the steady phase uses fresh MessageSids, so the stored ones
must be exactly those answered 200 (a 503'd one may also be stored: Twilio would retry).

Prints one JSON line (shape in `tools.bench.__main__`):
    {"bench": "gateway",
     "figures": {"bare_rps", "gateway_rps", "ratio" (gateway/bare, this run),
                 "bare_p50_ms", "bare_p99_ms", "gateway_p50_ms", "gateway_p99_ms" (wrk, max load),
                 "gateway_non200", "gateway_1p_rps", "ratio_1p" (one process),
                 "half_rate", "half_rate_achieved", "p50_half_rate_ms",
                 "p99_half_rate_ms", "max_half_rate_ms", "half_rate_non200",
                 "gateway_peak_rss_mb", "bare_peak_rss_mb",
                 "loadgen_cpu_pct", "loadgen_lag_p99_ms" (the steady client's CPU and lateness),
                 "answered_200_distinct", "stream_stored", "stream_check_ok" (1 = passed)},
     "targets": {"ratio": ">= 0.5", "p99_half_rate_ms": "<= 25"}, "params": {...},
     "notes": [...]}
Exit codes: 0 measured (targets met or not), 1 a server or NATS failed, 2 wrk unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from tools.bench.open_loop import OpenLoopResult, run_open_loop
from tools.bench.processes import HttpServer, ServerFailedError
from tools.bench.rss import PeakRss
from tools.bench.stream_check import stored_message_ids
from tools.bench.webhooks import (
    WEBHOOK_PATH,
    batch_of,
    new_nonce,
    raw_request,
    signed_webhooks,
)
from tools.bench.wrk import WrkMissingError, WrkResult, ensure_wrk, run_wrk, write_wrk_inputs
from tools.devstack import DevstackError, EmbeddedNats, free_port

ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "gateway-bench-auth-token"
WRK_BATCH, STEADY_BATCH = 1, 2
WARMUP_S = 3.0
TARGETS = {"ratio": ">= 0.5", "p99_half_rate_ms": "<= 25"}
FIGURE_ORDER = (
    "bare_rps",
    "gateway_rps",
    "ratio",
    "bare_p50_ms",
    "bare_p99_ms",
    "gateway_p50_ms",
    "gateway_p99_ms",
    "gateway_non200",
    "gateway_1p_rps",
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


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, nats_url: str) -> None:
        self.args, self.workdir, self.nats_url = args, workdir, nats_url
        self.gateway_port = free_port()
        self.public_base = f"http://127.0.0.1:{self.gateway_port}"
        self.nonce = new_nonce()
        self.figures: dict[str, float] = {}
        self.notes: list[str] = []
        self.wrk_runs: list[WrkResult] = []  # the gateway's, for the stream check
        self.steady: OpenLoopResult | None = None
        webhooks = signed_webhooks(
            self.public_base + WEBHOOK_PATH,
            ACCOUNT_SID,
            AUTH_TOKEN,
            count=args.bodies,
            batch=WRK_BATCH,
            nonce=self.nonce,
        )
        self.script, self.table = write_wrk_inputs(workdir, webhooks)

    def wrk(self, port: int, seconds: float) -> WrkResult:
        url = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
        return run_wrk(url, self.script, self.table, seconds=seconds, connections=self.args.c)

    def measure_bare(self) -> None:
        server = HttpServer("tools.bench.bare_app", free_port(), {}, self.workdir / "bare.log")
        server.start()
        rss = PeakRss(server.pid).start()
        try:
            self.wrk(server.port, WARMUP_S)
            result = self.wrk(server.port, self.args.seconds)
        finally:
            self.figures["bare_peak_rss_mb"] = round(rss.stop(), 1)
            server.stop()
        self.figures["bare_rps"] = round(result.ok_rps, 1)
        self.figures["bare_p50_ms"] = _ms(result.p50_ms)
        self.figures["bare_p99_ms"] = _ms(result.p99_ms)
        if result.status_errors or result.socket_errors:
            self.notes.append(f"bare: {result.status_errors} non-200, {result.socket_errors} errs")

    def measure_gateway(self) -> None:
        """The gateway as deployed (`--workers` processes): wrk, then the steady half rate."""
        self._gateway(self.args.workers, "gateway", steady=True)

    def measure_gateway_one_process(self) -> None:
        """The same with a single process, for the record (wrk only)."""
        if self.args.workers != 1:
            self._gateway(1, "gateway_1p", steady=False)

    def _gateway(self, workers: int, name: str, *, steady: bool) -> None:
        env = {
            "NATS_URL": self.nats_url,
            "PUBLIC_BASE_URL": self.public_base,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "GATEWAY_SENDER_MESSAGES_PER_MINUTE": "1000000",
            "GATEWAY_WORKERS": str(workers),
            "METRICS_PORT": str(free_port()),
        }
        log = self.workdir / f"{name}.log"
        server = HttpServer(self.args.gateway_module, self.gateway_port, env, log)
        server.start()
        rss = PeakRss(server.pid).start()
        try:
            self.wrk_runs.append(self.wrk(server.port, WARMUP_S))
            result = self.wrk(server.port, self.args.seconds)
            self.wrk_runs.append(result)
            if steady:
                # uvloop keeps the client's own CPU per request small (it shares the machine).
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    self.steady = runner.run(self._steady_load(result.ok_rps / 2))
        finally:
            self.figures[f"{name}_peak_rss_mb"] = round(rss.stop(), 1)
            server.stop()
        self.figures[f"{name}_rps"] = round(result.ok_rps, 1)
        self.figures[f"{name}_p50_ms"] = _ms(result.p50_ms)
        self.figures[f"{name}_p99_ms"] = _ms(result.p99_ms)
        self.figures[f"{name}_non200"] = result.status_errors
        if result.socket_errors:
            self.notes.append(f"{name} at max load: {result.socket_errors} socket errors")

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
        if by_batch.keys() - {WRK_BATCH, STEADY_BATCH}:
            problems.append("messages from outside this run")
        # wrk sends the table in order, from its start, in each run; all were answered 200 only
        # when there were no status errors; up to `c` requests per run were in flight at the end.
        reached = max(r.requests for r in self.wrk_runs)
        low = min(self.args.bodies, reached - sum(r.status_errors for r in self.wrk_runs))
        high = min(self.args.bodies, reached + self.args.c)
        if not low <= by_batch[WRK_BATCH] <= high:
            problems.append(f"wrk phases: {by_batch[WRK_BATCH]} stored, expected {low}..{high}")
        steady_stored = {sid for sid in counts if sid and batch_of(sid) == STEADY_BATCH}
        assert self.steady is not None
        answered_200 = {sid for sid, status in self.steady.statuses.items() if status == 200}
        not_200 = set(self.steady.statuses) - answered_200
        if answered_200 - steady_stored:
            problems.append(f"{len(answered_200 - steady_stored)} answered 200 but not stored")
        unexplained = steady_stored - answered_200 - not_200
        if unexplained and not self.steady.failures:
            problems.append(f"{len(unexplained)} stored without an answer")
        self.figures["answered_200_distinct"] = low + len(answered_200)
        self.figures["stream_stored"] = len(ids)
        self.figures["stream_check_ok"] = 0 if problems else 1
        if problems:
            self.notes.append("STREAM CHECK FAILED: " + "; ".join(problems))
        elif len(ids) > low + len(answered_200):
            self.notes.append(
                f"{len(ids) - low - len(answered_200)} stored without a 200 read by the client: "
                "requests in flight when wrk stopped, or answered 503 (allowed: Twilio retries)"
            )

    def report(self) -> dict[str, Any]:
        f = self.figures
        if f.get("bare_rps") and "gateway_rps" in f:
            f["ratio"] = round(f["gateway_rps"] / f["bare_rps"], 3)
        if f.get("bare_rps") and "gateway_1p_rps" in f:
            f["ratio_1p"] = round(f["gateway_1p_rps"] / f["bare_rps"], 3)
        figures = {k: f[k] for k in FIGURE_ORDER if k in f} | f
        params = {"wrk": f"-t1 -c{self.args.c}", "seconds": self.args.seconds}
        params |= {"bodies": self.args.bodies, "steady_seconds": self.args.steady_seconds}
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
    parser.add_argument("--seconds", type=float, default=10.0, help="measured wrk run length")
    parser.add_argument("--bodies", type=int, default=20_000, help="distinct webhooks for wrk")
    parser.add_argument("--steady-seconds", type=float, default=10.0, help="half-rate run length")
    parser.add_argument("-c", type=int, default=32, help="connections (wrk and steady load)")
    parser.add_argument(
        "--workers", type=int, default=2, help="gateway processes (GATEWAY_WORKERS), default 2"
    )
    parser.add_argument("--gateway-module", default="services.gateway", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        ensure_wrk()
    except WrkMissingError as exc:
        print(f"gateway bench: {exc}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    nats = EmbeddedNats(workdir / "nats")
    try:
        bench = Bench(args, workdir, nats.start())
        phases = [bench.measure_bare, bench.measure_gateway, bench.measure_gateway_one_process]
        if int(os.environ.get("SNAPSELL_BENCH_RUN", "1")) % 2 == 0:
            phases.reverse()
        for phase in phases:
            phase()
        bench.check_stream()
    except (ServerFailedError, DevstackError, RuntimeError) as exc:
        print(f"gateway bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        nats.stop()
        if args.keep:
            print(f"gateway bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(bench.report()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
