"""Two outbox processes drain one backlog; one is killed (SIGKILL) in the middle, with sends in
flight that Twilio accepted but the dead worker never recorded. Its leases run out, the other
worker claims those messages and settles them by asking Twilio first: nothing is lost and
Twilio accepts nothing twice. The same holds for a message an enqueue inserted already claimed
by its own process (direct dispatch) when that process dies."""

from __future__ import annotations

import uuid
from collections import Counter

from snapsell.outbox.v1 import outbox_pb2

from tests.integration.outbox.stack import SMS_SENDER, TENANT, OutboxStack, new_phone, sms
from tests.support.polling import eventually

MESSAGES = 2000
SENDERS = [f"+1415556{i:04d}" for i in range(8)]


async def test_a_worker_killed_mid_drain_loses_nothing_and_duplicates_nothing(
    stack: OutboxStack,
) -> None:
    # Every send takes a while, so the killed worker has many in flight.
    await stack.set_faults(latency_ms=300)
    await stack.add_channels(TENANT, *SENDERS)
    # Start both workers before the backlog exists, so they race for it from the first claim.
    settings = {
        "OUTBOX_MAX_IN_FLIGHT": "64",
        "OUTBOX_RATE_LIMIT_PER_SENDER": "0",
        "OUTBOX_SEND_TIMEOUT_SECONDS": "2",
        "OUTBOX_LEASE_SECONDS": "4",
    }
    first = await stack.start_outbox(**settings)
    second = await stack.start_outbox(**settings)
    ids = await stack.enqueue_many(
        [
            {
                "sender": SENDERS[i % len(SENDERS)],
                "recipient": sms(new_phone()),
                "body": f"crash drill message {i}",
                "idempotency_key": f"crash-{i}",
            }
            for i in range(MESSAGES)
        ]
    )

    async def first_worker_busy() -> bool:
        # Sending steadily, so sends are in flight (accepted or not) when it dies.
        sent_by_first = await stack.count(
            "SELECT count(*) FROM outbox.attempts WHERE outcome = 'accepted' AND worker_id LIKE $1",
            f"%:{first.process.pid}",
        )
        if sent_by_first < 100:
            return False
        # ... and holds leases right now, so its death leaves work behind to recover.
        held = await stack.count(
            "SELECT count(*) FROM outbox.messages WHERE status = 'sending' AND lease_owner LIKE $1",
            f"%:{first.process.pid}",
        )
        return held >= 1

    await eventually(first_worker_busy, timeout_s=60, every_s=0.02)
    first.kill()

    async def drained() -> bool:
        done = await stack.count(
            "SELECT count(*) FROM outbox.messages WHERE idempotency_key LIKE 'crash-%'"
            " AND status = 'sent'"
        )
        return done == MESSAGES

    await eventually(drained, timeout_s=90, every_s=0.5)
    accepted = Counter(
        m["body"] for m in await stack.sandbox_messages() if m["body"].startswith("crash drill")
    )
    assert len(accepted) == MESSAGES
    assert accepted.most_common(1)[0][1] == 1, "a message was accepted twice"
    assert len(set(ids)) == MESSAGES
    assert stack.db is not None
    expired = await stack.db.fetch(
        "SELECT message_id, worker_id FROM outbox.attempts WHERE outcome = 'lease_expired'"
    )
    # The dead worker's leases ran out and the survivor claimed those messages again ...
    assert expired, "the killed worker held nothing when it died"
    assert {row["worker_id"].rsplit(":", 1)[1] for row in expired} == {str(first.process.pid)}
    # ... and settled each one by asking Twilio before anything else: those the dead worker
    # had sent were found and adopted, the others sent for the first time.
    unsettled = await stack.count(
        "SELECT count(*) FROM outbox.attempts e WHERE e.outcome = 'lease_expired'"
        " AND NOT EXISTS (SELECT 1 FROM outbox.attempts r WHERE r.message_id = e.message_id"
        " AND r.id > e.id AND r.outcome IN ('reconciled_found', 'reconciled_not_found'))"
    )
    assert unsettled == 0
    adopted = await stack.count(
        "SELECT count(*) FROM outbox.attempts r JOIN outbox.attempts e USING (message_id)"
        " WHERE e.outcome = 'lease_expired' AND r.outcome = 'reconciled_found'"
    )
    assert adopted > 0, "no send of the dead worker was found at Twilio"
    assert second.process.poll() is None  # the survivor did the rest


async def test_a_process_killed_after_a_direct_dispatch_sends_its_message_once(
    stack: OutboxStack,
) -> None:
    for running in stack.outboxes:  # only the processes of this test claim
        running.stop()
    await stack.set_faults()
    settings = {"OUTBOX_SEND_TIMEOUT_SECONDS": "2", "OUTBOX_LEASE_SECONDS": "4"}
    first = await stack.start_outbox(**settings)
    # Until its pipeline has claimed once, a process cannot know what waits in the table, and
    # sends nothing directly: one message sent, and it has.
    warm_up = await stack.enqueue(recipient=sms(new_phone()), body="warm-up")
    await stack.wait_status(warm_up, "sent")
    # Twilio accepts the send, then holds the answer: the process dies before it hears of it.
    await stack.set_faults(timeout_after_accept_rate=1.0, timeout_s=30)
    phone, body = new_phone(), f"direct dispatch {uuid.uuid4().hex}"
    reply = await stack.outbox(first).Enqueue(
        outbox_pb2.EnqueueRequest(
            tenant_id=TENANT,
            sender=SMS_SENDER,
            idempotency_key=f"direct-{uuid.uuid4().hex}",
            recipient=sms(phone),
            body=body,
        ),
        metadata=stack.metadata(),
        timeout=10,
    )

    async def accepted() -> int:
        return len(await stack.sandbox_messages(to=phone))

    await eventually(accepted, "Twilio accepted the send", timeout_s=5, every_s=0.02)
    first.kill()
    assert stack.db is not None
    held = await stack.db.fetchrow(
        "SELECT status, lease_owner, attempt_started_at = created_at AS inserted_claimed"
        " FROM outbox.messages WHERE id = $1::uuid",
        reply.message_id,
    )
    assert held is not None
    # Claimed by its insert in the killed process, never by a claim statement.
    assert held["inserted_claimed"] is True
    assert (held["status"], held["lease_owner"].rsplit(":", 1)[1]) == (
        "sending",
        str(first.process.pid),
    )
    await stack.set_faults()
    await stack.start_outbox(**settings)
    await stack.wait_status(reply.message_id, "sent", timeout_s=30)
    sent_to = await stack.sandbox_messages(to=phone)
    assert [m["body"] for m in sent_to] == [body], "Twilio accepted the message twice"
    outcomes = await stack.db.fetch(
        "SELECT outcome, worker_id FROM outbox.attempts WHERE message_id = $1::uuid ORDER BY id",
        reply.message_id,
    )
    # The survivor claimed the expired lease and found the dead process's send at Twilio.
    assert [row["outcome"] for row in outcomes] == ["lease_expired", "reconciled_found"]
    assert outcomes[0]["worker_id"].endswith(f":{first.process.pid}")
    assert (
        await stack.db.fetchval(
            "SELECT twilio_sid FROM outbox.messages WHERE id = $1::uuid", reply.message_id
        )
        == sent_to[0]["sid"]
    )
