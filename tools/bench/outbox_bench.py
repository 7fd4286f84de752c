"""Outbox benchmark: drain rate against pgqueuer, and enqueue-to-accepted latency.

    python -m tools.bench.outbox_bench [--messages 20000] [--rate 200] [--seconds 15]
                                       [--trickle-messages 1500] [--trickle-rate 100]

Everything runs as real processes on this machine: PostgreSQL and NATS (embedded unless
DATABASE_URL / NATS_URL are set), the Twilio sandbox, routing (consent: one CheckOptOuts per
claimed batch), seller_admin (the channels Enqueue checks senders against) and the outbox.
Three measurements, one run:

1. pgqueuer 1.6 doing the outbox's sends (one `messages.create_async` per job, same client,
   same sandbox, same PostgreSQL) in its own process, at its best: no per-entrypoint
   `concurrency_limit`, sends bounded inside the job by a semaphore of the same size as the
   outbox's in-flight limit, its process given the outbox process's garbage-collector
   settings, and every `--pgqueuer-config` tried (`BATCH` or `BATCH:MAX_TASKS`:
   `run(batch_size=BATCH, max_concurrent_tasks=MAX_TASKS)`, the worker-wide cap on jobs held,
   which spares it thousands of idle tasks with heartbeats) to pick the fastest.
2. Drains, `COMPARISON_ROUNDS` rounds of three, the order rotated every round: `--messages`
   queued messages sent to the sandbox by the outbox (inserted in one transaction while the
   worker waits; rate limit off; rate = messages / (last result written - commit)), as many
   jobs by pgqueuer's fastest configuration ("send only"), and as many at that configuration
   that also ask routing's consent first with the outbox's own client ("same work"). Each
   ratio is the median of the rounds' own ratios: the fastest of several noisy tuning runs
   would overstate pgqueuer, and runs minutes apart would compare the machine's moods; each
   side's figures (CPU per message per process included) are from its median round.
   pgqueuer hands each job to its handler alone; the checks its jobs ask for in one turn of
   the event loop go to routing as one CheckOptOuts call (`CoalescedConsent`), as the outbox
   checks a claimed batch with one call. The trickle regime in the same rounds:
   `--trickle-messages` enqueued at `--trickle-rate` messages/s in transactions of 1-5
   (`TRICKLE_BATCH`), sent by the outbox and by pgqueuer doing the same work; both keep up,
   so `trickle_cpu_vs_pgqueuer_same_work` (pgqueuer's CPU per message, every process summed,
   over ours) and each side's p99 (enqueued -> sent) tell them apart. `counts_ok`
   (validity): every drain, tuning runs included, had all its messages accepted by the
   sandbox and none failed.
3. Latency: `Enqueue` over gRPC at a steady `--rate` for `--seconds`; latency = the worker's
   moment of receiving Twilio's 201 minus the moment the client called Enqueue; CPU per
   message of each process, the Enqueue calls included. Peak RSS (VmHWM) of the outbox
   process at the end.

The last line of stdout is the report for `make bench` (figures and the issue's targets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING

import asyncpg
import grpc
from snapsell.common.v1 import address_pb2
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc

from tools.bench.harness import at_rate, bearer, bench_stack, create_shop
from tools.bench.stats import cpu_seconds, peak_rss_mb, percentile, tree_cpu_seconds
from tools.stack import ROOT, Infrastructure, SystemStack

if TYPE_CHECKING:
    from services.outbox.clients import ConsentChecker, Recipient
    from services.outbox.domain import Consent

PGQUEUER_ENTRYPOINT = "twilio_send"
TARGETS = {
    "ratio_vs_pgqueuer_send_only": ">= 0.95",
    "ratio_vs_pgqueuer_same_work": ">= 1.0",
    "counts_ok": "== 1",
    "trickle_cpu_vs_pgqueuer_same_work": ">= 1.0",
    "latency.p99_ms": "<= 100",
}
# Tried in turn; see PgqueuerConfig.
PGQUEUER_CONFIGS = ("10", "25", "50", "100", "25:128", "50:256")
SENDER = "+14155550100"
# The tenant of the latency test's Enqueue calls, SENDER registered as its channel.
LATENCY_TENANT = "bench-latency"
# Polled while a queue drains: a look for one waiting row (the outbox's due index, pgqueuer's
# table), never a count of the whole table, and only twice a second, so the polling takes no
# CPU worth mentioning from the queue under test. The rate comes from the rows' timestamps, so
# how often this looks does not change it.
_OUTBOX_WAITING = """
SELECT EXISTS (SELECT 1 FROM outbox.messages
               WHERE status IN ('pending', 'sending') AND tenant_id = 'bench')
"""
_PGQUEUER_WAITING = "SELECT EXISTS (SELECT 1 FROM pgqueuer)"
DRAIN_POLL_S = 0.5
COMPARISON_ROUNDS = 3
_BACKLOG = """
INSERT INTO outbox.messages (tenant_id, idempotency_key, kind, account_sid, sender,
    recipient_channel, recipient, body, max_attempts)
SELECT 'bench', 'drain-' || i, 'conversational', $1, $2, 'sms',
    '+336' || lpad(i::text, 8, '0'), 'bench message ' || i, 5
FROM generate_series($3::int + 1, $3::int + $4::int) AS i
"""
_OUTBOX_P99_S = """
SELECT percentile_disc(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at))
FROM outbox.messages WHERE tenant_id = 'bench'
"""
_PGQUEUER_P99_S = """
SELECT percentile_disc(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM done.created - q.created))
FROM pgqueuer_log done JOIN pgqueuer_log q USING (job_id)
WHERE done.status = 'successful' AND q.status = 'queued'
"""
TRICKLE_BATCH = (1, 5)  # messages enqueued at once in the trickle regime, drawn uniformly


@dataclass(frozen=True)
class PgqueuerConfig:
    batch: int
    # 0: no worker-wide cap on the jobs held at once (pgqueuer's default).
    max_tasks: int = 0

    @classmethod
    def parse(cls, text: str) -> PgqueuerConfig:
        batch, _, max_tasks = text.partition(":")
        return cls(int(batch), int(max_tasks or 0))

    @property
    def text(self) -> str:
        return f"{self.batch}:{self.max_tasks}" if self.max_tasks else str(self.batch)


class BenchStack:
    """The processes of one run (`tools.bench.harness.bench_stack`), and what this
    benchmark asks of them; everything started is stopped by PID."""

    def __init__(self, stack: SystemStack, infra: Infrastructure, db: asyncpg.Pool) -> None:
        self.stack, self.db = stack, db
        self.keys = stack.keys
        self.outbox = stack.services["outbox"]
        # Known only for the servers this run started (then their CPU is reported too).
        self.postmaster = infra.postgres.pid if infra.postgres else None
        self.nats_pid = infra.nats.pid if infra.nats else None

    @classmethod
    async def start(cls, exits: AsyncExitStack, in_flight: int, claim_batch: int) -> BenchStack:
        outbox_env = {
            "OUTBOX_RATE_LIMIT_PER_SENDER": "0",
            "OUTBOX_MAX_IN_FLIGHT": str(in_flight),
            "OUTBOX_CLAIM_BATCH": str(claim_batch),
        }
        # The outbox checks each Enqueue's sender against seller_admin's channels.
        services = ("seller_admin", "routing", "outbox")
        stack, infra = await exits.enter_async_context(
            bench_stack(services, "outbox-bench-", service_env={"outbox": outbox_env})
        )
        db = await exits.enter_async_context(asyncpg.create_pool(infra.dsn, min_size=1, max_size=4))
        await create_shop(stack, LATENCY_TENANT, SENDER)
        return cls(stack, infra, db)

    def spawn_pgqueuer_worker(
        self, config: PgqueuerConfig, in_flight: int, consent: bool
    ) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "tools.bench.outbox_bench", "pgqueuer-worker"]
        routing = self.stack.address("routing") if consent else ""
        args = [self.stack.admin_dsn, self.stack.sandbox_url, config.text, str(in_flight), routing]
        # It asks routing for consent as the outbox does, with the outbox's key, and sends
        # with the stack's Twilio account (tokens go through the environment, never argv).
        env = {
            **os.environ,
            **self.keys.env("outbox"),
            "TWILIO_ACCOUNT_SID": self.stack.account_sid,
            "TWILIO_AUTH_TOKEN": self.stack.auth_token,
        }
        return subprocess.Popen(
            [*command, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )

    @staticmethod
    async def wait_line(process: subprocess.Popen[str], text: str) -> None:
        assert process.stdout is not None
        line = await asyncio.to_thread(process.stdout.readline)
        if text not in line:
            raise RuntimeError(f"expected {text!r} from the pgqueuer worker, got {line!r}")

    def cpu_snapshot(self, **extra: int) -> dict[str, float]:
        """CPU seconds used so far by each process of the run (by name)."""
        assert self.stack.sandbox is not None
        pids = {"sandbox": self.stack.sandbox.pid, "routing": self.stack.services["routing"].pid}
        pids |= extra
        if self.outbox.process.poll() is None:
            pids["outbox"] = self.outbox.pid
        if self.nats_pid is not None:  # the outbox relays its events to JetStream
            pids["nats"] = self.nats_pid
        usage = {name: cpu_seconds(pid) for name, pid in pids.items()}
        if self.postmaster is not None:
            usage["postgres"] = tree_cpu_seconds(self.postmaster)
        return usage

    async def reset_sandbox(self) -> None:
        await self.stack.sandbox_control("POST", "reset")

    async def sandbox_accepted(self) -> int:
        return int((await self.stack.sandbox_control("GET", "stats"))["accepted"])

    async def insert_outbox_backlog(self, messages: int, trickle: float | None) -> float:
        """A fresh backlog in tables as new as at the first drain (an earlier drain's rows, dead
        tuples and statistics gone), as pgqueuer starts each drain with its tables new: all at
        once, or with `trickle` (messages/s) in small transactions (`enqueue_backlog`)."""
        await self.db.execute("TRUNCATE outbox.attempts, outbox.messages, outbox.events")

        async def insert(first: int, count: int) -> None:
            async with self.db.acquire() as conn, conn.transaction():
                await conn.execute(_BACKLOG, self.stack.account_sid, SENDER, first, count)
                await conn.execute("NOTIFY outbox_due")

        return await enqueue_backlog(messages, trickle, insert)

    async def wait_outbox_sent(self, messages: int, started: float) -> float:
        while await self.db.fetchval(_OUTBOX_WAITING):
            if time.time() - started > 600:
                raise RuntimeError("the outbox did not drain within 10 minutes")
            await asyncio.sleep(DRAIN_POLL_S)
        row = await self.db.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'sent') AS sent,"
            " extract(epoch FROM max(updated_at)) AS last"
            " FROM outbox.messages WHERE tenant_id = 'bench'"
        )
        assert row is not None
        if row["sent"] != messages:
            raise RuntimeError(f"only {row['sent']} of {messages} sent")
        return float(row["last"])

    async def outbox_latencies(self, called_at: dict[str, float]) -> list[float]:
        while True:
            rows = await self.db.fetch(
                "SELECT idempotency_key, status, extract(epoch FROM sent_at) AS sent,"
                " extract(epoch FROM created_at) AS created"
                " FROM outbox.messages WHERE tenant_id = 'bench-latency'"
            )
            if len(rows) == len(called_at) and all(r["status"] == "sent" for r in rows):
                if os.environ.get("OUTBOX_BENCH_DEBUG"):
                    stored = [float(r["created"]) - called_at[r["idempotency_key"]] for r in rows]
                    print("enqueue part p50/p99:", percentile(stored, 50), percentile(stored, 99))
                return [float(r["sent"]) - called_at[r["idempotency_key"]] for r in rows]
            await asyncio.sleep(0.2)


async def enqueue_steadily(stack: BenchStack, rate: float, seconds: float) -> dict[str, float]:
    """Call Enqueue every 1/rate s (each call its own task, so a slow one does not delay the
    next); returns when each call was made, by idempotency key."""
    metadata = bearer(stack.keys.token("service", sub="routing", audience="outbox"))
    called_at: dict[str, float] = {}
    async with grpc.aio.insecure_channel(stack.outbox.address) as channel:
        stub = outbox_pb2_grpc.OutboxServiceStub(channel)

        async def enqueue(i: int, scheduled: float) -> None:
            key = f"latency-{i}"
            request = outbox_pb2.EnqueueRequest(
                tenant_id=LATENCY_TENANT,
                sender=SENDER,
                recipient=address_pb2.Address(
                    channel=address_pb2.CHANNEL_SMS, value=f"+337{i:08d}"
                ),
                body=f"latency message {i}",
                idempotency_key=key,
            )
            called_at[key] = time.time()
            await stub.Enqueue(request, metadata=metadata, timeout=10)

        await at_rate(enqueue, rate, int(rate * seconds))
    return called_at


async def enqueue_backlog(
    messages: int, rate: float | None, enqueue: Callable[[int, int], Awaitable[None]]
) -> float:
    """`enqueue(first, count)` all at once, or with a trickle `rate` (messages/s on average) in
    batches of `TRICKLE_BATCH` messages (seeded draw); returns when the (first) batch was
    enqueued (epoch s)."""
    if rate is None:
        await enqueue(0, messages)
        return time.time()
    rng = random.Random(messages)
    loop = asyncio.get_running_loop()
    begin, started, done = loop.time(), time.time(), 0
    while done < messages:
        await asyncio.sleep(max(0.0, begin + done / rate - loop.time()))
        count = min(rng.randint(*TRICKLE_BATCH), messages - done)
        await enqueue(done, count)
        done += count
    return started


def cpu_per_message_ms(
    before: dict[str, float], after: dict[str, float], messages: int
) -> dict[str, float]:
    return {
        name: round((after[name] - before[name]) / messages * 1000, 3)
        for name in after
        if name in before
    }


async def drain_outbox(
    stack: BenchStack, messages: int, trickle: float | None = None
) -> dict[str, object]:
    await stack.reset_sandbox()
    cpu_before = stack.cpu_snapshot()
    started = await stack.insert_outbox_backlog(messages, trickle)
    last = await stack.wait_outbox_sent(messages, started)
    cpu_after = stack.cpu_snapshot()
    accepted = await stack.sandbox_accepted()
    return {
        "seconds": last - started,
        "rate": messages / (last - started),
        "messages": messages,
        "accepted": accepted,
        "cpu_ms_per_message": cpu_per_message_ms(cpu_before, cpu_after, messages),
        "p99_ms": 1000 * float(await stack.db.fetchval(_OUTBOX_P99_S)),
    }


async def measure_latency(stack: BenchStack, rate: float, seconds: float) -> dict[str, object]:
    await stack.reset_sandbox()
    cpu_before = stack.cpu_snapshot()
    sent_at = await enqueue_steadily(stack, rate, seconds)
    latencies = await stack.outbox_latencies(sent_at)
    cpu_after = stack.cpu_snapshot()
    return {
        "messages": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
        # Enqueue calls included (the bench's client is not counted).
        "cpu_ms_per_message": cpu_per_message_ms(cpu_before, cpu_after, len(latencies)),
    }


async def drain_pgqueuer(
    stack: BenchStack,
    messages: int,
    config: PgqueuerConfig,
    in_flight: int,
    consent: bool,
    trickle: float | None = None,
) -> dict[str, object]:
    await stack.reset_sandbox()
    from pgqueuer.adapters.drivers.asyncpg import AsyncpgDriver
    from pgqueuer.adapters.persistence.queries import Queries

    conn = await asyncpg.connect(stack.stack.admin_dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        if await queries.schema_is_installed():
            await queries.uninstall()
        await queries.install()
        worker = stack.spawn_pgqueuer_worker(config, in_flight, consent)
        try:
            await stack.wait_line(worker, "pgqueuer ready")
            payloads: list[bytes | None] = [
                json.dumps({"to": f"+336{i:08d}", "body": f"bench message {i}"}).encode()
                for i in range(messages)
            ]
            cpu_before = stack.cpu_snapshot(pgqueuer=worker.pid)

            async def enqueue_jobs(first: int, count: int) -> None:
                jobs = payloads[first : first + count]
                await queries.enqueue([PGQUEUER_ENTRYPOINT] * count, jobs, [0] * count)

            started = await enqueue_backlog(messages, trickle, enqueue_jobs)
            while True:
                if not await conn.fetchval(_PGQUEUER_WAITING):
                    break
                await asyncio.sleep(DRAIN_POLL_S)
            last = await conn.fetchval(
                "SELECT extract(epoch FROM max(created)) FROM pgqueuer_log"
                " WHERE status = 'successful'"
            )
            cpu_after = stack.cpu_snapshot(pgqueuer=worker.pid)
            failed = await conn.fetchval(
                "SELECT count(*) FROM pgqueuer_log WHERE status <> 'successful'"
                " AND status NOT IN ('queued', 'picked')"
            )
            p99_s = await conn.fetchval(_PGQUEUER_P99_S)
        finally:
            worker.terminate()
            worker.wait(10)
        await queries.uninstall()
    finally:
        await conn.close()
    accepted = await stack.sandbox_accepted()
    elapsed = float(last) - started
    return {
        "batch_size": config.batch,
        "max_concurrent_tasks": config.max_tasks,
        "consent_check": consent,
        "seconds": elapsed,
        "rate": messages / elapsed,
        "messages": messages,
        "accepted": accepted,
        "failed": failed,
        "cpu_ms_per_message": cpu_per_message_ms(cpu_before, cpu_after, messages),
        "p99_ms": 1000 * float(p99_s),
    }


class CoalescedConsent:
    """Consent for pgqueuer's jobs at its best: the checks asked for in one turn of the event
    loop (the jobs of a dequeued batch start together) go to routing as one call."""

    def __init__(self, checker: ConsentChecker) -> None:
        self._checker = checker
        self._waiting: list[tuple[Recipient, asyncio.Future[Consent]]] = []
        self._calls: set[asyncio.Task[None]] = set()

    async def check(self, recipient: Recipient) -> Consent:
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._ask)
        future: asyncio.Future[Consent] = loop.create_future()
        self._waiting.append((recipient, future))
        return await future

    def _ask(self) -> None:
        waiting, self._waiting = self._waiting, []
        call = asyncio.create_task(self._answer(waiting))
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

    async def _answer(self, waiting: list[tuple[Recipient, asyncio.Future[Consent]]]) -> None:
        try:
            answers = await self._checker.check_many([recipient for recipient, _ in waiting])
        except Exception as error:  # each job fails, as its own call would have
            for _, future in waiting:
                future.set_exception(error)
            return
        for (_, future), answer in zip(waiting, answers, strict=True):
            future.set_result(answer)


async def pgqueuer_worker(
    dsn: str, api_url: str, config: PgqueuerConfig, in_flight: int, routing_addr: str
) -> None:
    """The pgqueuer side, in its own process: one Twilio send per job, after a consent check
    when `routing_addr` is given (asked before the job takes a send slot, so the checks of a
    dequeued batch are asked together)."""
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job

    from infra.auth import ServiceTokenProvider
    from infra.lifecycle import tune_garbage_collector
    from infra.twilio_http import make_twilio_client
    from services.outbox.clients import RoutingConsentChecker, routing_channel
    from services.outbox.domain import Channel

    consent = None
    if routing_addr:
        checker = RoutingConsentChecker(
            routing_channel(routing_addr),
            ServiceTokenProvider.from_env("outbox", audience="routing"),
            timeout_s=5.0,
        )
        consent = CoalescedConsent(checker)

    account_sid, auth_token = os.environ["TWILIO_ACCOUNT_SID"], os.environ["TWILIO_AUTH_TOKEN"]
    client = make_twilio_client(
        account_sid, auth_token, api_url, timeout_s=10.0, max_connections=in_flight
    )
    _ = client.messages  # load the SDK's lazy modules before timing, as the outbox does
    sends = asyncio.Semaphore(in_flight)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=10)
    pgq = PgQueuer.from_asyncpg_pool(pool)

    @pgq.entrypoint(PGQUEUER_ENTRYPOINT)
    async def twilio_send(job: Job) -> None:
        payload = json.loads(job.payload or b"{}")
        if consent is not None:
            answer = await consent.check(("bench", Channel.SMS, payload["to"]))
            if answer.opted_out:
                return
        async with sends:
            await client.messages.create_async(
                to=payload["to"],
                from_=SENDER,
                body=payload["body"],
                status_callback="http://127.0.0.1:9/webhooks/twilio/status",
            )

    # The outbox process's collector settings, so the two compare as queues, not as GC tunings.
    tune_garbage_collector()
    print("pgqueuer ready", flush=True)
    try:
        await pgq.run(batch_size=config.batch, max_concurrent_tasks=config.max_tasks)
    finally:
        await client.http_client.close()
        await pool.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    async with AsyncExitStack() as exits:
        stack = await BenchStack.start(exits, args.in_flight, args.claim_batch)
        report: dict[str, object] = {"messages": args.messages, "in_flight": args.in_flight}
        if args.skip_pgqueuer:
            report["outbox_drain"] = await drain_outbox(stack, args.messages)
            print("outbox drain:", report["outbox_drain"], flush=True)
        else:
            await compare_with_pgqueuer(stack, args, report)
        report["latency"] = await measure_latency(stack, args.rate, args.seconds)
        report["outbox_peak_rss_mb"] = peak_rss_mb(stack.outbox.pid)
        print("latency:", report["latency"], "peak RSS MB:", report["outbox_peak_rss_mb"])
        return report


async def compare_with_pgqueuer(
    stack: BenchStack, args: argparse.Namespace, report: dict[str, object]
) -> None:
    """pgqueuer's configurations tried in turn; then `COMPARISON_ROUNDS` rounds of one outbox
    drain and one drain by pgqueuer's fastest configuration, in alternating order, each ratio
    taken within its round (a slower minute on the machine weighs on both sides); then the
    same work at that configuration."""
    n, in_flight = args.messages, args.in_flight
    tuning = []
    for config in (PgqueuerConfig.parse(text) for text in args.pgqueuer_config):
        result = await drain_pgqueuer(stack, n, config, in_flight, consent=False)
        print(f"pgqueuer send_only {config.text}:", result, flush=True)
        tuning.append((config, result))
    best_config = max(tuning, key=lambda run: _rate(run[1]))[0]
    tn, rate = args.trickle_messages, args.trickle_rate
    sides: dict[str, Callable[[], Awaitable[dict[str, object]]]] = {
        "outbox": lambda: drain_outbox(stack, n),
        "pgqueuer_send_only": lambda: drain_pgqueuer(stack, n, best_config, in_flight, False),
        "pgqueuer_same_work": lambda: drain_pgqueuer(stack, n, best_config, in_flight, True),
        "trickle_outbox": lambda: drain_outbox(stack, tn, rate),
        "trickle_pgqueuer_same_work": lambda: drain_pgqueuer(
            stack, tn, best_config, in_flight, True, rate
        ),
    }
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in sides}
    for number in range(COMPARISON_ROUNDS):
        shift = number % len(sides)
        for name in [*sides][shift:] + [*sides][:shift]:
            runs[name].append(await sides[name]())
            print(f"round {number + 1}: {name} {best_config.text}:", runs[name][-1], flush=True)
    report["outbox_drain"] = _median_run(runs["outbox"])
    for name in ("pgqueuer_send_only", "pgqueuer_same_work"):
        report[f"{name}_best"] = _median_run(runs[name])
        ratios = (_rate(o) / _rate(t) for o, t in zip(runs["outbox"], runs[name], strict=True))
        report[f"ratio_vs_{name}"] = median(ratios)
    # Trickling, both keep up with the rate: what they cost per message tells them apart.
    report["trickle_outbox"] = _median_run(runs["trickle_outbox"])
    report["trickle_pgqueuer_same_work"] = _median_run(runs["trickle_pgqueuer_same_work"])
    report["trickle_cpu_vs_pgqueuer_same_work"] = median(
        _total_cpu(t) / _total_cpu(o)
        for o, t in zip(runs["trickle_outbox"], runs["trickle_pgqueuer_same_work"], strict=True)
    )
    every_drain = [result for _, result in tuning] + [r for side in runs.values() for r in side]
    report["counts_ok"] = int(
        all(r["accepted"] == r["messages"] and not r.get("failed") for r in every_drain)
    )


def _total_cpu(result: dict[str, object]) -> float:
    cpu = result["cpu_ms_per_message"]
    assert isinstance(cpu, dict)
    return float(sum(cpu.values()))


def _median_run(runs: list[dict[str, object]]) -> dict[str, object]:
    return sorted(runs, key=_rate)[len(runs) // 2]


def _rate(result: dict[str, object]) -> float:
    rate = result["rate"]
    assert isinstance(rate, int | float)
    return float(rate)


def main(argv: list[str]) -> int:
    if argv[:1] == ["pgqueuer-worker"]:
        dsn, api_url, config, in_flight, routing = argv[1:6]
        import uvloop

        worker = pgqueuer_worker(
            dsn, api_url, PgqueuerConfig.parse(config), int(in_flight), routing
        )
        uvloop.run(worker)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0, help="latency test msg/s")
    parser.add_argument("--seconds", type=float, default=15.0, help="latency test length")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--claim-batch", type=int, default=200)
    parser.add_argument(
        "--pgqueuer-config",
        nargs="+",
        default=list(PGQUEUER_CONFIGS),
        help="pgqueuer settings to try, BATCH or BATCH:MAX_TASKS (best one reported)",
    )
    parser.add_argument("--trickle-messages", type=int, default=1500)
    parser.add_argument("--trickle-rate", type=float, default=100.0, help="trickle msg/s")
    parser.add_argument("--skip-pgqueuer", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TMPDIR", tempfile.gettempdir())
    report = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"bench": "outbox", "figures": report, "targets": TARGETS}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
