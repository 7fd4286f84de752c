"""Issue #24's outage: in the middle of a steady load, Twilio is down (the sandbox answers every
send with a 503) for SNAPSELL_CHAOS_TWILIO_OUTAGE_SECONDS (`make chaos`: 120, `make test`: 10),
then back. A message is retried for its kind's time budget (15 minutes conversational,
24 hours compliance), not for five attempts (spent within seconds), so once Twilio is back every
message the load was owed is sent, exactly once, and none is dead-lettered for the outage.
Those Twilio refuses for good (21211) and those outside WhatsApp's 24-hour window are still
dead-lettered, with that reason. The load (with its claims answered by the live catalog through
the outbox) runs for twice the outage, a quarter of it before."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import asyncpg

from infra import jetstream
from tests.chaos.audit import CLAIM_REPLY_KEY, REPLY_KEY_SUFFIX, SENT, Report, counts
from tests.chaos.calls import DriverCalls
from tests.chaos.faults import SANDBOX_HEALTHY, ChaosWorld, configure_sandbox
from tests.chaos.load import UNREACHABLE_ERROR_CODE, Load, LoadSize, rate_from_env
from tests.chaos.records import SETTLE_TIMEOUT_S, Records, read_records, wait_until_settled
from tests.chaos.webhooks import WebhookPoster
from tests.e2e.harness import shop_from_api

OUTAGE_S = float(os.environ.get("SNAPSELL_CHAOS_TWILIO_OUTAGE_SECONDS", "10"))
DOWN = {**SANDBOX_HEALTHY, "error_rate": 1.0, "error_status": 503}
OLD_BUDGET_ATTEMPTS = 5
DEAD_AT_ONCE = frozenset({"permanent_error", "outside_session_window"})
SHOPS = 3
# Beyond the load and the outage, how long the driver's calls may go on being retried.
CALL_GRACE_S = 300.0
# Failed attempts per message of the load, to show the outage outlasted the old budget.
_FAILED_ATTEMPTS = """
SELECT m.idempotency_key, count(*) AS failed
FROM outbox.messages m JOIN outbox.attempts a ON a.message_id = m.id
WHERE m.idempotency_key = ANY ($1::text[]) AND a.outcome = 'retryable_error'
GROUP BY 1
"""


async def test_a_twilio_outage_during_the_load_dead_letters_nothing_it_was_owed(
    chaos_world: ChaosWorld,
) -> None:
    world, stack = chaos_world, chaos_world.stack
    rate = rate_from_env()
    size = LoadSize.for_webhooks(max(300, int(rate * OUTAGE_S * 2)))
    deadline_s = size.webhooks / rate + OUTAGE_S + CALL_GRACE_S
    shops = [await shop_from_api(stack, f"outage-{index}") for index in range(SHOPS)]
    poster = WebhookPoster(
        stack.public_base_url, stack.auth_token, concurrency=32, deadline_s=deadline_s
    )
    calls = DriverCalls(
        stack.address("outbox"), stack.address("routing"), stack.keys, deadline_s=deadline_s
    )
    load = Load(stack.account_sid, poster, calls, shops, size, rate=rate)
    healthy = {
        **SANDBOX_HEALTHY,
        "error_code_for": {load.unreachable.phone: UNREACHABLE_ERROR_CODE},
    }
    outage_done = asyncio.Event()

    async def twilio_down_then_back() -> float:
        try:
            await poster.wait_accepted(size.webhooks // 4)
            at = time.monotonic() - started
            await configure_sandbox(stack.sandbox_url, DOWN)
            await asyncio.sleep(OUTAGE_S)
            await configure_sandbox(stack.sandbox_url, healthy)
            return at
        finally:
            outage_done.set()

    try:
        await configure_sandbox(stack.sandbox_url, healthy)
        started = time.monotonic()
        async with asyncio.TaskGroup() as group:
            group.create_task(load.run(outage_done))
            outage = group.create_task(twilio_down_then_back())
        load_s = time.monotonic() - started
    finally:
        await calls.close()
        await poster.close()

    db = await asyncpg.connect(world.postgres.dsn)
    nats = await jetstream.connect(world.nats.url, name="chaos-outage-audit")
    try:
        settle_s = await wait_until_settled(db, list(poster.tally.accepted), list(load.claims))
        records = await read_records(db, nats.jetstream(), stack.sandbox_url, world.processes())
        keys = [m["idempotency_key"] for m in _messages_of(load, records)]
        rows = await db.fetch(_FAILED_ATTEMPTS, keys)
        failed = {row["idempotency_key"]: row["failed"] for row in rows}
    finally:
        await db.close()
        await nats.close()

    report = Report()
    report.section(
        f"Twilio down (every send answered 503) for {OUTAGE_S:g}s",
        [
            ("from / seconds into the load", f"{outage.result():.0f}s / load {load_s:.0f}s"),
            ("webhooks answered 200", len(poster.tally.accepted)),
            ("settled after the load (s)", "never" if settle_s is None else f"{settle_s:.0f}"),
        ],
    )
    if settle_s is None:
        report.problems.append(f"the system did not settle within {SETTLE_TIMEOUT_S:g}s")
    _audit(load, records, failed, report)
    print(f"\n== Twilio outage ==\n{report.render()}\n")
    assert not report.problems, "\n".join(report.problems) + f"\n(logs in {stack.work_dir})"


def _messages_of(load: Load, records: Records) -> list[asyncpg.Record]:
    """The outbox messages of this load: its enqueues, the replies to its keywords and the
    catalog's replies to its claims."""
    replies = {f"{sid}{REPLY_KEY_SUFFIX}" for sid in load.keywords}
    replies |= {f"{CLAIM_REPLY_KEY}{sid}" for sid in load.claims}
    return [
        m
        for m in records.messages
        if m["idempotency_key"].startswith(load.key_prefix) or m["idempotency_key"] in replies
    ]


def _audit(load: Load, records: Records, failed: dict[str, int], report: Report) -> None:
    messages = _messages_of(load, records)
    by_id = {m["id"]: m for m in messages}
    sids = {sent["sid"] for sent in records.sandbox}
    bodies = Counter(sent["body"] for sent in records.sandbox)
    unique_bodies = {e.body for e in load.enqueued}  # replies share their wording

    def sent_once(message: asyncpg.Record) -> bool:
        if message["status"] not in SENT or message["twilio_sid"] not in sids:
            return False
        return message["body"] not in unique_bodies or bodies[message["body"]] == 1

    must_block = {e.message_id for e in load.enqueued if e.must_block}
    # Also the replies to the refused number's own HELPs.
    refused = {m["id"] for m in messages if m["recipient"] == load.unreachable.phone}
    must_die = {e.message_id for e in load.enqueued if e.must_die} | refused
    # Blocked ones are consent's business (a toggler's message may be), not the outage's.
    owed = [
        m for m in messages if m["id"] not in must_block | must_die and m["status"] != "blocked"
    ]
    dead = [m for m in messages if m["status"] == "dead"]
    replied = Counter(m["idempotency_key"].removesuffix(REPLY_KEY_SUFFIX) for m in messages)
    outlived = sum(n > OLD_BUDGET_ATTEMPTS for n in failed.values())
    report.section(
        "outbound messages of the load",
        [
            (
                "enqueued / consent replies / catalog replies",
                f"{len(load.enqueued)} / {len(load.keywords)} / {len(load.claims)}",
            ),
            ("  by status", counts(Counter(m["status"] for m in messages))),
            ("  dead, by reason", counts(Counter(m["dead_reason"] for m in dead))),
            ("owed a send / sent exactly once", f"{len(owed)} / {sum(map(sent_once, owed))}"),
            (f"messages that failed more than {OLD_BUDGET_ATTEMPTS} attempts", outlived),
            ("  most failed attempts of one message", max(failed.values(), default=0)),
            ("errors logged (apart from NATS reconnects)", counts(records.logged_errors)),
        ],
    )
    report.expect_none(
        "messages owed a send not sent exactly once",
        [f"{m['id']} ({m['status']})" for m in owed if not sent_once(m)],
    )
    report.expect_none(
        "messages dead-lettered for the outage",
        [f"{m['id']} ({m['dead_reason']})" for m in dead if m["dead_reason"] not in DEAD_AT_ONCE],
    )
    report.expect_none(
        "messages to opted-out recipients not blocked",
        [i for i in must_block if by_id[i]["status"] != "blocked"],
    )
    report.expect_none(
        "messages to a refused or never-writing number not dead",
        [i for i in must_die if by_id[i]["status"] != "dead"],
    )
    report.expect_none(
        "STOP/START/HELP without exactly one reply",
        [sid for sid in load.keywords if replied[sid] != 1],
    )
    if not outlived:
        report.problems.append(
            f"no message failed more than {OLD_BUDGET_ATTEMPTS} attempts: the outage proved nothing"
        )
    report.expect_none("service processes that died and stayed dead", records.exited)
    report.expect_none("kinds of error logged by the services", records.logged_errors.keys())
