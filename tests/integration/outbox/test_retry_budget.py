"""Twilio down for a while (the sandbox answers every send with a 503), then back: a message is
retried for its kind's time budget, not for five attempts. With this module's quick backoff
(0.05 s doubling up to 0.4 s) five attempts are spent in about a second; the outages here last
several times that."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
from snapsell.outbox.v1 import outbox_pb2

from tests.integration.outbox.stack import OutboxStack, eventually, new_phone, sms

OUTAGE_S = 4.0
OLD_BUDGET_ATTEMPTS = 5
DOWN = {"error_rate": 1.0, "error_status": 503}
# Every message from the same number: no rate limit, so each retries as often as it may.
UNLIMITED = {"OUTBOX_RATE_LIMIT_PER_SENDER": "0"}


def _messages(label: str, count: int) -> list[dict[str, object]]:
    """`count` conversational and `count` compliance messages, each to its own number."""
    kinds = (outbox_pb2.MESSAGE_KIND_CONVERSATIONAL, outbox_pb2.MESSAGE_KIND_COMPLIANCE)
    return [
        {"recipient": sms(new_phone()), "body": f"{label} {kind} {i}", "kind": kind}
        for kind in kinds
        for i in range(count)
    ]


async def _rows(stack: OutboxStack, ids: list[str]) -> list[asyncpg.Record]:
    assert stack.db is not None
    rows = await stack.db.fetch(
        "SELECT id::text, kind, status, dead_reason, body, attempt_count,"
        " extract(epoch FROM dead_at - budget_started_at) AS dead_after_s"
        " FROM outbox.messages WHERE id = ANY ($1::uuid[])",
        ids,
    )
    return list(rows)


async def _statuses(stack: OutboxStack, ids: list[str]) -> Counter[str]:
    return Counter(row["status"] for row in await _rows(stack, ids))


async def test_an_outage_longer_than_five_attempts_ends_with_every_message_sent(
    stack: OutboxStack,
) -> None:
    await stack.set_faults(**DOWN)
    outbox = await stack.start_outbox(**UNLIMITED)  # the default budgets: 15 min, 24 h
    try:
        ids = await stack.enqueue_many(_messages("outage", 20))
        await asyncio.sleep(OUTAGE_S)
        during = await _rows(stack, ids)
        assert {row["status"] for row in during} <= {"pending", "sending"}, during
        assert min(row["attempt_count"] for row in during) > OLD_BUDGET_ATTEMPTS

        await stack.set_faults()  # Twilio is back

        async def all_sent() -> bool:
            return await _statuses(stack, ids) == Counter(sent=len(ids))

        await eventually(all_sent, timeout_s=20)
    finally:
        assert outbox.stop() == 0
    accepted = Counter(m["body"] for m in await stack.sandbox_messages())
    assert all(accepted[row["body"]] == 1 for row in await _rows(stack, ids))


async def test_a_message_still_failing_at_its_kinds_deadline_is_dead_lettered(
    stack: OutboxStack,
) -> None:
    await stack.set_faults(**DOWN)
    outbox = await stack.start_outbox(
        **UNLIMITED,
        OUTBOX_RETRY_BUDGET_CONVERSATIONAL_SECONDS="2",
        OUTBOX_RETRY_BUDGET_COMPLIANCE_SECONDS="60",
    )
    try:
        ids = await stack.enqueue_many(_messages("deadline", 10))

        async def conversational_dead() -> bool:
            rows = await _rows(stack, ids)
            return all(r["status"] == "dead" for r in rows if r["kind"] == "conversational")

        await eventually(conversational_dead, timeout_s=10)
        rows = await _rows(stack, ids)
        compliance = [r for r in rows if r["kind"] == "compliance"]
        assert {r["status"] for r in compliance} <= {"pending", "sending"}
        for row in rows:
            if row["kind"] == "conversational":
                assert row["dead_reason"] == "attempts_exhausted"
                # At the deadline (the last retry is planned at it), not after five attempts
                # (about a second here).
                assert 2.0 <= float(row["dead_after_s"]) < 3.0, row

        await stack.set_faults()
        compliance_ids = [r["id"] for r in compliance]

        async def compliance_sent() -> bool:
            return await _statuses(stack, compliance_ids) == Counter(sent=len(compliance_ids))

        await eventually(compliance_sent, timeout_s=20)
    finally:
        assert outbox.stop() == 0
