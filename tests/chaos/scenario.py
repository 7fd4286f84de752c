"""One fault scenario from start to verdict: the load (`load.Load`) runs at a steady rate while
the scenario's faults strike one after the other; then the system is left to settle, what it
recorded is read (`records`) and audited (`audit`), and the report is printed with its counts.
The run fails on any problem the audit finds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from infra import jetstream
from tests.chaos.audit import SENT, Report, audit, counts
from tests.chaos.calls import DriverCalls
from tests.chaos.faults import (
    SANDBOX_FAULTS,
    SANDBOX_HEALTHY,
    Fault,
    FaultRecord,
    configure_sandbox,
    run_faults,
)
from tests.chaos.load import UNREACHABLE_ERROR_CODE, Load, LoadSize
from tests.chaos.records import SETTLE_TIMEOUT_S, Records, read_records, wait_until_settled
from tests.chaos.webhooks import WebhookPoster, WebhookTally
from tests.e2e.harness import shop_from_api
from tests.support.processes import RunningService
from tests.support.stack import SystemStack

SHOPS = 3
WEBHOOK_CONCURRENCY = 32
# Beyond the planned length of the load, how long retries may go on before the run fails.
RETRY_GRACE_S = 300.0


@dataclass
class Scenario:
    title: str
    stack: SystemStack
    postgres_dsn: str
    nats_url: str  # the audit's connection (admin)
    processes: Callable[[], list[RunningService]]  # every service process running now
    plan: Sequence[Fault]


async def run_scenario(scenario: Scenario, size: LoadSize, rate: float) -> None:
    stack = scenario.stack
    deadline_s = size.webhooks / rate + RETRY_GRACE_S
    shops = [await shop_from_api(stack, f"chaos-{index}") for index in range(SHOPS)]
    poster = WebhookPoster(
        stack.public_base_url,
        stack.auth_token,
        concurrency=WEBHOOK_CONCURRENCY,
        deadline_s=deadline_s,
    )
    calls = DriverCalls(
        stack.address("outbox"), stack.address("routing"), stack.keys, deadline_s=deadline_s
    )
    load = Load(stack.account_sid, poster, calls, shops, size, rate=rate)
    unreachable = {"error_code_for": {load.unreachable.phone: UNREACHABLE_ERROR_CODE}}
    try:
        await configure_sandbox(stack.sandbox_url, {**SANDBOX_FAULTS, **unreachable})
        started = time.monotonic()
        faults = await _faults_under_load(scenario.plan, load, poster, size.webhooks, started)
        load_s = time.monotonic() - started
        await configure_sandbox(stack.sandbox_url, {**SANDBOX_HEALTHY, **unreachable})  # the drain
    finally:
        await calls.close()
        await poster.close()

    report = Report()
    report.section(
        "faults (seconds into the load; until running again)",
        [
            (f"{f.at_s:5.1f}s {f.kind}", f"{f.took_s:.1f}s ({f.at_utc} UTC): {f.detail}")
            for f in faults
        ]
        + [("all through the load: the Twilio sandbox", _sandbox_faults())],
    )
    tally = poster.tally
    # Opened only now: the faults would have broken them.
    db = await asyncpg.connect(scenario.postgres_dsn)
    nats = await jetstream.connect(scenario.nats_url, name="chaos-audit")
    try:
        claims = [sid for sid in load.claims if sid in tally.accepted]
        settle_s = await wait_until_settled(db, list(tally.accepted), claims)
        settled = "never" if settle_s is None else f"{settle_s:.0f}"
        records = await read_records(db, nats.jetstream(), stack.sandbox_url, scenario.processes())
    finally:
        await db.close()
        await nats.close()
    report.section(
        f"load: {size.webhooks:,} webhooks at {rate:g}/s",
        [
            ("webhooks posted / answered 200", f"{tally.posted} / {len(tally.accepted)}"),
            ("  every answer, by status or error", counts(tally.answers)),
            ("  webhooks retried (same MessageSid)", len(tally.retried)),
            ("outbound messages enqueued by the load", len(load.enqueued)),
            ("driver gRPC calls failed, then retried", counts(calls.failed_attempts)),
            ("seconds: load + faults / settling after", f"{load_s:.0f} / {settled}"),
        ],
    )
    if settle_s is None:
        report.problems.append(f"the system did not settle within {SETTLE_TIMEOUT_S:g}s")
    audit(records, load, tally.accepted, report)
    report.section("counts", _counts(tally, records))
    print(f"\n== {scenario.title} ==\n{report.render()}\n")
    assert not report.problems, "\n".join(report.problems) + f"\n(logs in {stack.work_dir})"


def _counts(tally: WebhookTally, records: Records) -> list[tuple[str, object]]:
    """The headline figures of the audit above, on a few lines."""
    accepted = tally.accepted
    recorded = {message["twilio_sid"] for message in records.messages if message["twilio_sid"]}
    sent = [message for message in records.messages if message["status"] in SENT]
    doubled = sum(count - 1 for sid, count in records.routed.items() if sid in accepted)
    second_sends = sum(1 for sent_ in records.sandbox if sent_["sid"] not in recorded)
    return [
        ("webhooks answered 200", len(accepted)),
        ("webhook answers 503 (retried by the sender)", tally.answers["503"]),
        ("processed: ledger rows / MessageRouted", _processed(accepted, records)),
        ("sends: sandbox accepted / messages sent", f"{len(records.sandbox)} / {len(sent)}"),
        ("duplicates: MessageRouted / sends", f"{doubled} / {second_sends}"),
    ]


def _processed(accepted: Mapping[str, str], records: Records) -> str:
    rows = sum(1 for sid in accepted if sid in records.ledger)
    return f"{rows} / {sum(records.routed[sid] for sid in accepted)}"


async def _faults_under_load(
    plan: Sequence[Fault], load: Load, poster: WebhookPoster, total: int, started: float
) -> list[FaultRecord]:
    faults_done = asyncio.Event()

    async def strike_all() -> list[FaultRecord]:
        try:
            return await run_faults(
                [(kind, _counting_503s(poster.tally, strike)) for kind, strike in plan],
                accepted=lambda: len(poster.tally.accepted),
                wait_accepted=poster.wait_accepted,
                total=total,
                started=started,
            )
        finally:
            faults_done.set()

    load_task = asyncio.create_task(load.run(faults_done))
    faults_task = asyncio.create_task(strike_all())
    try:
        faults, _ = await asyncio.gather(faults_task, load_task)
    finally:
        for task in (load_task, faults_task):
            task.cancel()
        await asyncio.gather(load_task, faults_task, return_exceptions=True)
    return faults


def _counting_503s(
    tally: WebhookTally, strike: Callable[[], Awaitable[str]]
) -> Callable[[], Awaitable[str]]:
    """The fault, its detail followed by the webhooks answered 503 while it lasted."""

    async def counted() -> str:
        before = tally.answers["503"]
        detail = await strike()
        return f"{detail}; {tally.answers['503'] - before} answered 503 meanwhile"

    return counted


def _sandbox_faults() -> str:
    return (
        f"{SANDBOX_FAULTS['error_rate']:.0%} 500, {SANDBOX_FAULTS['rate_limit_rate']:.0%} 429 "
        f"(Retry-After {SANDBOX_FAULTS['retry_after_s']}s), "
        f"{SANDBOX_FAULTS['timeout_after_accept_rate']:.0%} timeout after accepting"
    )
