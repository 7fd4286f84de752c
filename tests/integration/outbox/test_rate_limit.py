"""The per-sender token bucket, which holds back one tenant's burst and no other tenant, and a
clean stop: a SIGTERM hands back what was claimed but not sent, at once, for any worker."""

from __future__ import annotations

import time

from tests.integration.outbox.stack import TENANT, OutboxStack, new_phone, sms
from tests.support.polling import eventually

BURST_SERVICE = "MG" + "3" * 32
QUIET_SERVICE = "MG" + "4" * 32


async def sent_times(stack: OutboxStack, ids: list[str]) -> list[float]:
    assert stack.db is not None
    rows = await stack.db.fetch(
        "SELECT extract(epoch FROM sent_at) AS at FROM outbox.messages"
        " WHERE id = ANY ($1::uuid[]) AND status = 'sent' ORDER BY sent_at",
        ids,
    )
    return [float(row["at"]) for row in rows]


async def test_a_senders_rate_is_held_and_a_quiet_tenant_is_not_stuck_behind_a_burst(
    stack: OutboxStack,
) -> None:
    await stack.add_channels("burst-shop", BURST_SERVICE)
    await stack.add_channels("quiet-shop", QUIET_SERVICE)
    outbox = await stack.start_outbox(
        OUTBOX_RATE_LIMIT_PER_SENDER="40", OUTBOX_RATE_LIMIT_BURST="1"
    )
    burst = await stack.enqueue_many(
        [
            {
                "tenant_id": "burst-shop",
                "sender": BURST_SERVICE,
                "recipient": sms(new_phone()),
                "body": f"flash sale {i}",
            }
            for i in range(200)
        ]
    )
    quiet_enqueued = time.time()
    quiet = await stack.enqueue_many(
        [
            {
                "tenant_id": "quiet-shop",
                "sender": QUIET_SERVICE,
                "recipient": sms(new_phone()),
                "body": f"your receipt {i}",
            }
            for i in range(3)
        ]
    )

    async def quiet_sent() -> bool:
        return len(await sent_times(stack, quiet)) == len(quiet)

    await eventually(quiet_sent, timeout_s=20)
    assert max(await sent_times(stack, quiet)) - quiet_enqueued < 1.5
    assert len(await sent_times(stack, burst)) < len(burst) // 2  # the burst is still going

    async def burst_sent() -> bool:
        return len(await sent_times(stack, burst)) == len(burst)

    await eventually(burst_sent, timeout_s=30)
    times = await sent_times(stack, burst)
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate <= 40 * 1.1, f"{rate:.1f} messages/s through a sender limited to 40/s"
    assert outbox.stop() == 0


async def test_sigterm_hands_back_unsent_messages_and_exits_cleanly(stack: OutboxStack) -> None:
    outbox = await stack.start_outbox(OUTBOX_RATE_LIMIT_PER_SENDER="5", OUTBOX_RATE_LIMIT_BURST="1")
    sender = "+14155557777"
    await stack.add_channels(TENANT, sender)
    ids = await stack.enqueue_many(
        [
            {"sender": sender, "recipient": sms(new_phone()), "body": f"slow lane {i}"}
            for i in range(30)
        ]
    )

    async def some_sent() -> bool:
        return len(await sent_times(stack, ids)) >= 3

    await eventually(some_sent, timeout_s=20)
    assert outbox.stop() == 0
    assert stack.db is not None
    rows = await stack.db.fetch(
        "SELECT status, lease_owner, next_attempt_at <= now() AS due FROM outbox.messages"
        " WHERE id = ANY ($1::uuid[])",
        ids,
    )
    statuses = [row["status"] for row in rows]
    assert set(statuses) <= {"sent", "pending"} and "pending" in statuses
    assert all(
        row["lease_owner"] is None and row["due"] for row in rows if row["status"] == "pending"
    )
    accepted = [m for m in await stack.sandbox_messages() if m["from"] == sender]
    assert len(accepted) == statuses.count("sent")
