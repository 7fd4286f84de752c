"""Issue #8's fault suite: while a steady load of signed webhooks and enqueued messages runs
through the whole system (every service its own process, the Twilio sandbox, PostgreSQL and
NATS), every fault kind strikes; afterwards nothing is lost, nothing is doubled and consent was
never broken. The counts are printed: `make chaos` runs it with 5,000 webhooks, `make test`
with `load.DEFAULT_WEBHOOKS`."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from infra import jetstream
from tests.chaos.audit import Report, audit, counts
from tests.chaos.calls import DriverCalls
from tests.chaos.faults import (
    SANDBOX_FAULTS,
    SANDBOX_HEALTHY,
    ChaosWorld,
    FaultRecord,
    fault_plan,
    run_faults,
)
from tests.chaos.load import UNREACHABLE_ERROR_CODE, Load, LoadSize, rate_from_env
from tests.chaos.records import SETTLE_TIMEOUT_S, read_records, wait_until_settled
from tests.chaos.webhooks import WebhookPoster
from tests.e2e.harness import shop_from_api

SHOPS = 3
WEBHOOK_CONCURRENCY = 32
# Beyond the planned length of the load, how long retries may go on before the run fails.
RETRY_GRACE_S = 300.0


async def test_every_message_is_handled_once_and_consent_holds_through_faults(
    chaos_world: ChaosWorld,
) -> None:
    world, stack = chaos_world, chaos_world.stack
    size, rate = LoadSize.from_env(), rate_from_env()
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
        await world.sandbox_faults({**SANDBOX_FAULTS, **unreachable})
        started = time.monotonic()
        faults = await _faults_under_load(world, load, poster, size.webhooks, started)
        load_s = time.monotonic() - started
        await world.sandbox_faults({**SANDBOX_HEALTHY, **unreachable})  # for the drain
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
    db = await asyncpg.connect(world.postgres.dsn)
    nats = await jetstream.connect(world.nats.url, name="chaos-audit")
    try:
        claims = [sid for sid in load.claims if sid in tally.accepted]
        settle_s = await wait_until_settled(db, list(tally.accepted), claims)
        settled = "never" if settle_s is None else f"{settle_s:.0f}"
        records = await read_records(db, nats.jetstream(), stack.sandbox_url, world.processes())
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
    print(f"\n== chaos ==\n{report.render()}\n")
    assert not report.problems, "\n".join(report.problems) + f"\n(logs in {stack.work_dir})"


async def _faults_under_load(
    world: ChaosWorld, load: Load, poster: WebhookPoster, total: int, started: float
) -> list[FaultRecord]:
    faults_done = asyncio.Event()

    async def strike_all() -> list[FaultRecord]:
        try:
            return await run_faults(
                fault_plan(world),
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


def _sandbox_faults() -> str:
    return (
        f"{SANDBOX_FAULTS['error_rate']:.0%} 500, {SANDBOX_FAULTS['rate_limit_rate']:.0%} 429 "
        f"(Retry-After {SANDBOX_FAULTS['retry_after_s']}s), "
        f"{SANDBOX_FAULTS['timeout_after_accept_rate']:.0%} timeout after accepting"
    )
