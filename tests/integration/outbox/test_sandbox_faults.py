"""2,000 messages through a Twilio that fails often: 30% HTTP 500, 10% 429 with Retry-After,
5% timeouts after accepting. Every message must end sent, dead or blocked; none may be lost;
Twilio must never accept one twice -- the timeouts are settled by asking Twilio, not by
sending again."""

from __future__ import annotations

import time
from collections import Counter

from tests.integration.outbox.stack import TENANT, OutboxStack, new_phone, sms
from tests.support.polling import eventually

MESSAGES = 2000
SENDERS = [f"+1415555{i:04d}" for i in range(8)]


async def test_every_message_ends_sent_dead_or_blocked_and_none_is_accepted_twice(
    stack: OutboxStack,
) -> None:
    started = time.monotonic()
    await stack.add_channels(TENANT, *SENDERS)
    await stack.start_outbox(OUTBOX_MAX_IN_FLIGHT="64")
    phones = [new_phone() for _ in range(MESSAGES)]
    opted_out = phones[:20]
    invalid = phones[20:30]
    for phone in opted_out:
        await stack.opt_out(sms(phone))
    await stack.set_faults(
        error_rate=0.30,
        rate_limit_rate=0.10,
        retry_after_s=0.2,
        timeout_after_accept_rate=0.05,
        timeout_s=5,
        error_code_for=dict.fromkeys(invalid, 21211),
        seed=20261123,
    )
    ids = await stack.enqueue_many(
        [
            {
                "sender": SENDERS[i % len(SENDERS)],
                "recipient": sms(phone),
                "body": f"fault drill message {i}",
                "idempotency_key": f"drill-{i}",
            }
            for i, phone in enumerate(phones)
        ]
    )
    assert len(set(ids)) == MESSAGES

    async def all_settled() -> bool:
        waiting = await stack.count(
            "SELECT count(*) FROM outbox.messages WHERE tenant_id = $1"
            " AND status IN ('pending', 'sending')",
            TENANT,
        )
        return waiting == 0

    await eventually(all_settled, timeout_s=90, every_s=0.5)
    assert stack.db is not None
    rows = await stack.db.fetch(
        "SELECT id::text, status, dead_reason, twilio_sid, body, recipient"
        " FROM outbox.messages WHERE idempotency_key LIKE 'drill-%'"
    )
    assert len(rows) == MESSAGES  # none lost
    statuses = Counter(row["status"] for row in rows)
    assert set(statuses) <= {"sent", "dead", "blocked"}, statuses
    assert statuses["blocked"] == len(opted_out)
    dead_reasons = Counter(row["dead_reason"] for row in rows if row["status"] == "dead")
    assert dead_reasons["permanent_error"] == len(invalid)

    accepted = [m for m in await stack.sandbox_messages() if m["body"].startswith("fault drill")]
    by_body = Counter(m["body"] for m in accepted)
    assert by_body.most_common(1)[0][1] == 1, "a message was accepted twice"
    sent = {row["body"]: row["twilio_sid"] for row in rows if row["status"] == "sent"}
    # What Twilio holds is exactly what the outbox says it sent, SID for SID.
    assert {m["body"]: m["sid"] for m in accepted} == sent
    reconciled = await stack.count(
        "SELECT count(*) FROM outbox.attempts WHERE outcome = 'reconciled_found'"
    )
    assert reconciled > 0, "no timeout-after-accept was settled by reconciliation"
    assert time.monotonic() - started < 90
