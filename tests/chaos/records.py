"""What every part of the system recorded once the faults are over: the routing ledger,
`MessageRouted` on JetStream, the outbox's messages and attempts, routing's consent events, the
Twilio sandbox's record of every message it accepted (Twilio's count), and what the service
processes logged as errors."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from nats.js import JetStreamContext, api
from snapsell.routing.v1 import events_pb2

from tests.e2e.harness import eventually
from tests.support.processes import RunningService

ROUTED_SUBJECT = "routing.v1.message.routed"
OPT_OUT_RECORDED = "routing.v1.opt_out.recorded"
OPT_OUT_REMOVED = "routing.v1.opt_out.removed"
SETTLE_TIMEOUT_S = 240.0
# nats-py logs each failed reconnect attempt at ERROR, with a traceback, when it is given no
# error callback: expected while NATS is down or cut off, so not a finding.
EXPECTED_ERROR_LOGGERS = frozenset({"nats.aio.client"})

_SETTLED = """
SELECT
    (SELECT count(*) FROM routing.processed_inbound WHERE message_sid = ANY($1::text[])) AS routed,
    (SELECT count(*) FROM routing.events WHERE published_at IS NULL) AS unrelayed,
    (SELECT count(*) FROM outbox.messages WHERE status IN ('pending', 'sending')) AS unsettled,
    (SELECT count(*) FROM live_catalog.processed_inbound WHERE message_sid = ANY($2::text[]))
        AS claims_handled,
    (SELECT count(*) FROM live_catalog.replies WHERE enqueued_at IS NULL AND failure IS NULL)
        AS replies_unsent
"""
# The catalog's reply to each claim (keyed by its MessageSid) and the outbox message it became.
_CLAIM_REPLIES = """
SELECT r.idempotency_key, r.enqueued_at IS NOT NULL AS enqueued, r.failure,
    (SELECT count(*) FROM outbox.messages m
     WHERE m.tenant_id = r.tenant_id AND m.idempotency_key = r.idempotency_key) AS in_outbox
FROM live_catalog.replies r WHERE r.idempotency_key LIKE 'live_catalog:reply:%'
"""
# Per item: units held or confirmed beyond stock, and counters the reservation rows disagree
# with; then clients with more than one live reservation of an item.
_OVERSOLD = """
SELECT i.code, i.tenant_id, i.stock, i.held, i.confirmed, i.waiting, r.held AS rows_held,
    r.confirmed AS rows_confirmed, r.waiting AS rows_waiting
FROM live_catalog.items i LEFT JOIN LATERAL (
    SELECT coalesce(sum(quantity) FILTER (WHERE status = 'held'), 0) AS held,
        coalesce(sum(quantity) FILTER (WHERE status = 'confirmed'), 0) AS confirmed,
        count(*) FILTER (WHERE status = 'waiting') AS waiting
    FROM live_catalog.reservations WHERE item_id = i.id
) r ON true
WHERE i.held + i.confirmed > i.stock OR (i.held, i.confirmed, i.waiting)
    IS DISTINCT FROM (r.held, r.confirmed, r.waiting)
"""
_TWICE_RESERVED = """
SELECT item_id, client_value FROM live_catalog.reservations WHERE status <> 'released'
GROUP BY item_id, client_channel, client_value HAVING count(*) > 1
"""
_MESSAGES = """
SELECT id::text AS id, tenant_id, idempotency_key, kind, recipient_channel, recipient, body,
    status, twilio_sid, dead_reason, created_at, updated_at
FROM outbox.messages
"""
# The story of each message dead-lettered for a reason of ours, not the recipient's.
_DEAD_LETTER_ATTEMPTS = """
SELECT m.id::text AS message_id, m.dead_reason, a.outcome, a.http_status, a.error_code,
    a.error_message, a.worker_id, a.started_at, a.finished_at
FROM outbox.messages m JOIN outbox.attempts a ON a.message_id = m.id
WHERE m.status = 'dead' AND m.dead_reason IN ('attempts_exhausted', 'outcome_unknown')
ORDER BY m.id, a.id
"""
_CONSENT_EVENTS = """
SELECT subject, tenant_id, aggregate_id, created_at, published_at
FROM routing.events WHERE subject = ANY($1::text[])
"""


@dataclass
class Records:
    ledger: dict[str, str]  # MessageSid -> outcome
    catalog_ledger: dict[str, str]  # live_catalog's: MessageSid -> the command it read
    claim_replies: dict[str, asyncpg.Record]  # live_catalog's reply key -> its reply row
    oversold: list[asyncpg.Record]  # items whose counters exceed stock or disagree with rows
    twice_reserved: list[asyncpg.Record]  # (item, client) with two live reservations
    reservations: Counter[str]  # live_catalog reservations by status
    routed: Counter[str]  # MessageSid -> MessageRouted events on JetStream
    messages: list[asyncpg.Record]  # outbox.messages
    attempts: Counter[str]  # outbox attempt outcome -> count
    dead_letter_attempts: list[asyncpg.Record]  # of messages dead for a reason of ours
    consent_events: list[asyncpg.Record]  # routing's opt-out recorded / removed events
    sandbox: list[dict[str, Any]]  # every message the sandbox accepted
    sandbox_stats: dict[str, Any]
    logged_errors: Counter[str]  # "<service>: <event>" -> ERROR lines (bugs, not outages)
    exited: list[str]  # service processes that are no longer running


async def wait_until_settled(
    db: asyncpg.Connection, sids: Sequence[str], claims: Sequence[str]
) -> float | None:
    """Until every accepted webhook is in the ledger, routing relayed all its events, the
    catalog handled every claim and handed every reply to the outbox, and no outbound message
    is pending or being sent any more: how long that took, or None when it did not happen
    within SETTLE_TIMEOUT_S (the audit then shows what is missing)."""
    started = time.monotonic()

    async def settled() -> bool:
        row = await db.fetchrow(_SETTLED, list(sids), list(claims))
        assert row is not None
        return (
            row["routed"] == len(sids)
            and row["claims_handled"] == len(claims)
            and not (row["unrelayed"] or row["unsettled"] or row["replies_unsent"])
        )

    try:
        await eventually(settled, timeout_s=SETTLE_TIMEOUT_S, every_s=0.5)
    except AssertionError:
        return None
    return time.monotonic() - started


async def read_records(
    db: asyncpg.Connection,
    js: JetStreamContext,
    sandbox_url: str,
    processes: Sequence[RunningService],
) -> Records:
    errors = logged_errors({process.log_path for process in processes})
    ledger = await db.fetch("SELECT message_sid, outcome FROM routing.processed_inbound")
    attempts = await db.fetch("SELECT outcome, count(*) AS n FROM outbox.attempts GROUP BY 1")
    async with httpx.AsyncClient(base_url=sandbox_url, timeout=60) as client:
        sent = (await client.get("/_sandbox/messages")).raise_for_status().json()["messages"]
        stats = (await client.get("/_sandbox/stats")).raise_for_status().json()
    catalog = await db.fetch("SELECT message_sid, outcome FROM live_catalog.processed_inbound")
    replies = await db.fetch(_CLAIM_REPLIES)
    statuses = await db.fetch(
        "SELECT status, count(*) AS n FROM live_catalog.reservations GROUP BY 1"
    )
    return Records(
        ledger={row["message_sid"]: row["outcome"] for row in ledger},
        catalog_ledger={row["message_sid"]: row["outcome"] for row in catalog},
        claim_replies={row["idempotency_key"]: row for row in replies},
        oversold=list(await db.fetch(_OVERSOLD)),
        twice_reserved=list(await db.fetch(_TWICE_RESERVED)),
        reservations=Counter({row["status"]: row["n"] for row in statuses}),
        routed=await routed_events(js),
        messages=list(await db.fetch(_MESSAGES)),
        attempts=Counter({row["outcome"]: row["n"] for row in attempts}),
        dead_letter_attempts=list(await db.fetch(_DEAD_LETTER_ATTEMPTS)),
        consent_events=list(await db.fetch(_CONSENT_EVENTS, [OPT_OUT_RECORDED, OPT_OUT_REMOVED])),
        sandbox=list(sent),
        sandbox_stats=stats,
        logged_errors=errors,
        exited=[f"{p.name} (pid {p.pid})" for p in processes if p.process.poll() is not None],
    )


def logged_errors(log_paths: Iterable[Path]) -> Counter[str]:
    """ERROR and CRITICAL lines in the services' JSON logs by "<service>: <event>", raw
    tracebacks (a crash before logging was set up) included; the expected NATS reconnect
    errors are left out."""
    unexpected: Counter[str] = Counter()
    for path in log_paths:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("Traceback"):
                unexpected[f"{path.name}: unhandled exception"] += 1
            try:
                record = json.loads(line) if line.startswith("{") else {}
            except ValueError:  # the last line of a process killed mid-write
                continue
            if record.get("level") not in ("ERROR", "CRITICAL"):
                continue
            if record.get("logger") in EXPECTED_ERROR_LOGGERS:
                continue
            unexpected[f"{record.get('service')}: {record.get('event')}"] += 1
    return unexpected


async def routed_events(js: JetStreamContext) -> Counter[str]:
    """MessageSid -> how many `MessageRouted` the ROUTING_EVENTS stream holds for it."""
    subscription = await js.pull_subscribe(
        ROUTED_SUBJECT,
        stream="ROUTING_EVENTS",
        config=api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.NONE
        ),
    )
    found: Counter[str] = Counter()
    try:
        while True:
            try:
                batch = await subscription.fetch(1000, timeout=2.0)
            except TimeoutError:
                return found
            for msg in batch:
                found[events_pb2.MessageRouted.FromString(msg.data).message.message_sid] += 1
    finally:
        await subscription.unsubscribe()
