"""The reply dispatcher against the real PostgreSQL, with a hand-written sender: sent replies
are marked, a reply the outbox refuses is recorded and not retried, one that meets an outbox
outage stays pending for the next round, and two dispatchers never send one row twice."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from services.live_catalog.replies import (
    PeerUnavailableError,
    PendingReply,
    ReplyDispatcher,
    ReplyRejectedError,
)

pytestmark = pytest.mark.usefixtures("clean_tables")


class ScriptedSender:
    def __init__(self, answers: dict[str, Exception] | None = None) -> None:
        self.answers = answers or {}
        self.sent: list[str] = []

    async def enqueue(self, reply: PendingReply) -> str:
        await asyncio.sleep(0.01)  # let a second dispatcher run meanwhile
        self.sent.append(reply.idempotency_key)
        error = self.answers.get(reply.idempotency_key)
        if error is not None:
            raise error
        return f"msg-{reply.idempotency_key}"


async def queue(pool: asyncpg.Pool, *keys: str) -> None:
    for key in keys:
        await pool.execute(
            "INSERT INTO replies (tenant_id, idempotency_key, sender, recipient_channel,"
            " recipient_value, account_sid, body, correlation_id)"
            " VALUES ('t', $1, 'MG1', 'whatsapp', '+33611', 'AC1', 'bonjour', 'SM1')",
            key,
        )


async def test_sent_rejected_and_unavailable_replies(pool: asyncpg.Pool) -> None:
    await queue(pool, "ok", "refused", "outage")
    sender = ScriptedSender(
        {
            "refused": ReplyRejectedError("outbox.Enqueue: INVALID_ARGUMENT: bad sender"),
            "outage": PeerUnavailableError("outbox.Enqueue: UNAVAILABLE"),
        }
    )
    assert await ReplyDispatcher(pool, sender).dispatch_once() == (2, 1)
    rows = {
        row["idempotency_key"]: (row["outbox_message_id"], row["failure"], row["enqueued_at"])
        for row in await pool.fetch("SELECT * FROM replies")
    }
    assert rows["ok"][:2] == ("msg-ok", None)
    assert rows["refused"][:2] == (None, "outbox.Enqueue: INVALID_ARGUMENT: bad sender")
    assert rows["outage"][2] is None  # still pending

    sender.answers.clear()
    assert await ReplyDispatcher(pool, sender).dispatch_once() == (1, 0)
    assert sender.sent.count("refused") == 1 and sender.sent.count("outage") == 2


async def test_two_dispatchers_send_each_reply_once(pool: asyncpg.Pool) -> None:
    await queue(pool, *(f"k{i}" for i in range(50)))
    sender = ScriptedSender()
    first, second = (
        ReplyDispatcher(pool, sender, batch_size=10),
        ReplyDispatcher(pool, sender, batch_size=10),
    )

    async def drain(dispatcher: ReplyDispatcher) -> None:
        while (await dispatcher.dispatch_once())[0]:
            pass

    await asyncio.gather(drain(first), drain(second))
    assert sorted(sender.sent) == sorted(f"k{i}" for i in range(50))
