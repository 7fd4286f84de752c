"""Consent per claimed batch, with routing's real consent ledger: one CheckOptOuts call decides
a whole batch (opted-out recipients blocked, the others sent), while routing cannot answer
every message waits, neither sent nor blocked, until it can, the batch check is traced, and a
message enqueued before a STOP is never sent later than OUTBOX_CONSENT_MAX_AGE_SECONDS after
the STOP committed."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.outbox.stack import (
    ACCOUNT_SID,
    SMS_SENDER,
    TENANT,
    OutboxStack,
    new_phone,
    sms,
    whatsapp,
)
from tests.support.polling import eventually
from tools.devstack import free_port

MESSAGES = 150
CHECK_ONE = "/snapsell.routing.v1.RoutingService/CheckOptOut"
CHECK_MANY = "/snapsell.routing.v1.RoutingService/CheckOptOuts"
# No rate limit: the whole batch is sent at once, so no answer grows old enough to be re-asked.
UNLIMITED = {"OUTBOX_RATE_LIMIT_PER_SENDER": "0", "OUTBOX_CLAIM_BATCH": "200"}


async def routing_calls(stack: OutboxStack) -> dict[str, float]:
    """Calls routing has answered OK so far, by method."""
    assert stack.routing is not None
    port = stack.routing.env["METRICS_PORT"]
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    calls: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "snapsell_grpc_server_handled":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["code"] == "OK":
                    calls[sample.labels["method"]] = sample.value
    return calls


async def insert_backlog(stack: OutboxStack, phones: list[str], key: str) -> None:
    """Messages committed together, so the worker claims them in one batch."""
    assert stack.db is not None
    async with stack.db.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO outbox.messages (tenant_id, idempotency_key, kind, account_sid, sender,
                recipient_channel, recipient, body, max_attempts)
            SELECT $1, $2 || n, 'conversational', $3, $4, 'sms', phone, 'flash sale', 5
            FROM unnest($5::text[]) WITH ORDINALITY AS p(phone, n)
            """,
            TENANT,
            key,
            ACCOUNT_SID,
            SMS_SENDER,
            phones,
        )
        await conn.execute("NOTIFY outbox_due")


async def statuses(stack: OutboxStack, key: str) -> dict[str, str]:
    assert stack.db is not None
    rows = await stack.db.fetch(
        "SELECT recipient, status FROM outbox.messages WHERE idempotency_key LIKE $1 || '%'", key
    )
    return {row["recipient"]: row["status"] for row in rows}


async def test_one_call_decides_a_claimed_batch_of_opted_in_and_opted_out_recipients(
    stack: OutboxStack,
) -> None:
    outbox = await stack.start_outbox(**UNLIMITED)
    try:
        phones = [new_phone() for _ in range(MESSAGES)]
        opted_out = set(phones[::3])
        for n, phone in enumerate(sorted(opted_out)):
            # Consent is per person: an opt-out on WhatsApp blocks SMS to the number too.
            await stack.opt_out((whatsapp if n % 2 else sms)(phone))
        before = await routing_calls(stack)
        await insert_backlog(stack, phones, "batch-")

        async def all_decided() -> bool:
            return set((await statuses(stack, "batch-")).values()) <= {"sent", "blocked"}

        await eventually(all_decided, timeout_s=30)
        decided = await statuses(stack, "batch-")
        assert {p for p, s in decided.items() if s == "blocked"} == opted_out
        sent = {m["to"] for m in await stack.sandbox_messages() if m["to"] in decided}
        assert sent == set(phones) - opted_out
        after = await routing_calls(stack)
        assert after.get(CHECK_ONE, 0) == before.get(CHECK_ONE, 0)
        # One call for the claimed batch; a second claim may race the insert's commit.
        assert 1 <= after[CHECK_MANY] - before.get(CHECK_MANY, 0) <= 2
    finally:
        outbox.stop()


async def test_messages_wait_while_routing_cannot_answer_and_are_sent_once_it_can(
    stack: OutboxStack,
) -> None:
    silent = f"127.0.0.1:{free_port()}"  # nothing listens there
    waiting = await stack.start_outbox(ROUTING_ADDR=silent, **UNLIMITED)
    phones = [new_phone() for _ in range(5)]
    try:
        await insert_backlog(stack, phones, "unchecked-")
        await asyncio.sleep(2.0)  # several consent retries (OUTBOX_CONSENT_RETRY_SECONDS=0.2)
        assert set((await statuses(stack, "unchecked-")).values()) <= {"pending", "sending"}
        assert (
            await stack.count(
                "SELECT count(*) FROM outbox.attempts a"
                " JOIN outbox.messages m ON m.id = a.message_id"
                " WHERE m.idempotency_key LIKE 'unchecked-%'"
            )
            == 0
        )
        assert [m for m in await stack.sandbox_messages() if m["to"] in phones] == []
    finally:
        assert waiting.stop() == 0
    answering = await stack.start_outbox(**UNLIMITED)
    try:

        async def all_sent() -> bool:
            return set((await statuses(stack, "unchecked-")).values()) == {"sent"}

        await eventually(all_sent, timeout_s=30)
        assert sorted(m["to"] for m in await stack.sandbox_messages() if m["to"] in phones) == (
            sorted(phones)
        )
    finally:
        answering.stop()


async def test_the_batch_check_is_traced_and_the_sends_of_its_batch_are_traced_too(
    stack: OutboxStack, tmp_path: Path
) -> None:
    trace_file = tmp_path / "spans.jsonl"
    outbox = await stack.start_outbox(SNAPSELL_TRACE_FILE=str(trace_file), **UNLIMITED)
    try:
        phones = [new_phone() for _ in range(3)]
        await insert_backlog(stack, phones, "traced-")

        async def all_sent() -> bool:
            return set((await statuses(stack, "traced-")).values()) == {"sent"}

        await eventually(all_sent, timeout_s=30)
    finally:
        assert outbox.stop() == 0
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    [check] = [s for s in spans if s["name"] == "outbox.check_consent"]
    assert check["attributes"]["snapsell.messages"] == len(phones)
    [call] = [s for s in spans if s["name"] == CHECK_MANY and s["kind"] == "CLIENT"]
    assert call["parent_id"] == check["span_id"] and call["trace_id"] == check["trace_id"]
    sends = [s for s in spans if s["name"] == "outbox.send"]
    assert len(sends) == len(phones)
    assert {s["attributes"]["snapsell.outbox.status"] for s in sends} == {"sent"}


async def test_no_message_is_sent_later_than_the_consent_bound_after_its_stop_committed(
    stack: OutboxStack,
) -> None:
    """The bound: a send is decided on a CheckOptOuts answer at most
    OUTBOX_CONSENT_MAX_AGE_SECONDS old, and routing answers from its ledger, so a STOP
    committed before the answer blocks the send, and one committed after it was committed at
    most that long before the send. Here the messages are claimed (and their batch answered)
    before the STOPs, then held back by the rate limit for longer than the bound."""
    bound_s = 0.5
    # 2 sends/s: four messages claimed at once (twice the rate), sent 0.5 s apart.
    outbox = await stack.start_outbox(
        OUTBOX_RATE_LIMIT_PER_SENDER="2",
        OUTBOX_RATE_LIMIT_BURST="1",
        OUTBOX_CONSENT_MAX_AGE_SECONDS=str(bound_s),
    )
    try:
        phones = [new_phone() for _ in range(4)]
        await insert_backlog(stack, phones, "bound-")

        async def first_sent() -> bool:
            return "sent" in (await statuses(stack, "bound-")).values()

        await eventually(first_sent, timeout_s=20, every_s=0.01)
        waiting = [p for p, s in (await statuses(stack, "bound-")).items() if s != "sent"]
        for phone in waiting:
            await stack.opt_out(sms(phone))
        stopped_at = time.time()  # every STOP committed

        async def all_decided() -> bool:
            return set((await statuses(stack, "bound-")).values()) <= {"sent", "blocked"}

        await eventually(all_decided, timeout_s=20)
        assert stack.db is not None
        rows = await stack.db.fetch(
            "SELECT recipient, status, extract(epoch FROM sent_at) AS sent_at"
            " FROM outbox.messages WHERE recipient = ANY ($1::text[])",
            waiting,
        )
        # The third and fourth sends come 1 s and 1.5 s after the first, past the bound.
        assert len(waiting) >= 2 and sum(r["status"] == "blocked" for r in rows) >= 2, rows
        # A send decided on an answer asked before a STOP: within the bound (+ the send itself).
        deadline = stopped_at + bound_s + 0.3
        late = [r for r in rows if r["status"] == "sent" and r["sent_at"] > deadline]
        assert late == [], (stopped_at, rows)
    finally:
        outbox.stop()
