"""Routing in batches against a real PostgreSQL (the peers are small fakes): one transaction and
one EnqueueMany per batch, duplicates inside a batch, one contact's keywords in the order they
were received, and a message the database refuses that does not hold back the rest of its
batch."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import pytest
from snapsell.common.v1 import address_pb2

from services.routing.clients import ComplianceReply, ReplyRejectedError
from services.routing.domain import DEFAULT_HELP_REPLY, RulesBook
from services.routing.inbound import Delivery, InboundRouter, Routed, RouteOutcome
from tests.integration.routing.fakes import (
    FakeReplies,
    FakeSenders,
    FakeSessions,
    inbound,
    minutes_ago,
)


def router_for(pool: asyncpg.Pool, replies: FakeReplies | None = None) -> InboundRouter:
    return InboundRouter(
        pool,
        senders=FakeSenders(),
        sessions=FakeSessions(),
        replies=replies or FakeReplies(),
        rules=RulesBook(),
    )


def outcomes(results: Sequence[Routed | Exception]) -> list[RouteOutcome | str]:
    return [r.outcome if isinstance(r, Routed) else type(r).__name__ for r in results]


async def test_a_batch_is_one_enqueue_call_and_a_duplicate_in_it_has_no_effect(
    clean: asyncpg.Pool,
) -> None:
    replies = FakeReplies()
    router = router_for(clean, replies)
    help_, stop, chat = inbound("HELP"), inbound("STOP", sender="+33622222222"), inbound("salut")
    batch = [Delivery(m, n) for n, m in enumerate([help_, stop, help_, chat], start=1)]
    results = await router.route_batch(batch)
    assert outcomes(results) == [
        RouteOutcome.ROUTED,
        RouteOutcome.ROUTED,
        RouteOutcome.DUPLICATE,  # the second copy of the same MessageSid
        RouteOutcome.ROUTED,
    ]
    assert replies.calls == 1 and len(replies.messages) == 2  # HELP and STOP, one call
    assert await clean.fetchval("SELECT count(*) FROM processed_inbound") == 3
    assert (
        await clean.fetchval(
            "SELECT count(*) FROM events WHERE subject = 'routing.v1.message.routed'"
        )
        == 3
    )
    # Redelivered as a whole: every message is a duplicate now, nothing is called again.
    again = await router.route_batch([Delivery(d.message, d.stream_sequence) for d in batch])
    assert set(outcomes(again)) == {RouteOutcome.DUPLICATE}
    assert replies.calls == 1


async def test_one_contacts_keywords_in_a_batch_apply_in_the_order_they_were_received(
    clean: asyncpg.Pool,
) -> None:
    replies = FakeReplies()
    stop = inbound("STOP", at=minutes_ago(2))
    start = inbound("START", at=minutes_ago(1))
    # The stream brought the newer START first; the ledger must still see STOP, then START.
    await router_for(clean, replies).route_batch([Delivery(start, 1), Delivery(stop, 2)])
    assert await clean.fetchval("SELECT count(*) FROM opt_outs") == 0
    log = await clean.fetch("SELECT state, outcome FROM consent_log ORDER BY effective_at")
    assert [(r["state"], r["outcome"]) for r in log] == [
        ("opted_out", "changed"),
        ("opted_in", "changed"),
    ]
    assert len(replies.messages) == 2  # both confirmed, in that order of effect


async def test_one_persons_keywords_on_two_channels_apply_in_the_order_they_were_received(
    clean: asyncpg.Pool,
) -> None:
    stop = inbound("STOP", at=minutes_ago(2))  # on WhatsApp
    start = inbound("START", at=minutes_ago(1))
    start.sender.channel = start.recipient.channel = address_pb2.CHANNEL_SMS
    # The newer START on SMS came first; it still lifts the older STOP sent on WhatsApp.
    await router_for(clean, FakeReplies()).route_batch([Delivery(start, 1), Delivery(stop, 2)])
    assert await clean.fetchval("SELECT count(*) FROM opt_outs") == 0
    log = await clean.fetch(
        "SELECT channel, scope, state, outcome FROM consent_log ORDER BY effective_at"
    )
    assert [tuple(r) for r in log] == [
        ("whatsapp", "person", "opted_out", "changed"),
        ("sms", "person", "opted_in", "changed"),
    ]


async def test_the_last_inbound_is_committed_before_the_replies_are_enqueued_and_the_ledger_after(
    clean: asyncpg.Pool,
) -> None:
    seen: list[tuple[int, int]] = []

    class Observing(FakeReplies):
        async def send_compliance_replies(
            self, replies: Sequence[ComplianceReply]
        ) -> list[str | ReplyRejectedError]:
            # From another connection: what is committed while the batch waits for the outbox.
            seen.append(
                (
                    await clean.fetchval("SELECT count(*) FROM last_inbound"),
                    await clean.fetchval("SELECT count(*) FROM processed_inbound"),
                )
            )
            return await super().send_compliance_replies(replies)

    batch = [Delivery(inbound("HELP", sender=f"+3363333333{n}"), n) for n in range(3)]
    await router_for(clean, Observing()).route_batch(batch)
    assert seen == [(3, 0)]  # every window open already; nothing of the batch committed yet
    assert await clean.fetchval("SELECT count(*) FROM processed_inbound") == 3


async def test_a_message_the_database_refuses_does_not_hold_back_its_batch(
    clean: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    replies = FakeReplies()
    # PostgreSQL text cannot hold a NUL: this sender's last inbound time cannot be written.
    poison = inbound("HELP", sender="+33 6 55\x00 55 55")
    good = [inbound("HELP", sender=f"+3365555{n:04d}") for n in range(7)]
    batch = [Delivery(m, n) for n, m in enumerate([*good[:3], poison, *good[3:]])]
    results = await router_for(clean, replies).route_batch(batch)
    assert outcomes(results)[3] == "CharacterNotInRepertoireError"
    assert [o for n, o in enumerate(outcomes(results)) if n != 3] == [RouteOutcome.ROUTED] * 7
    assert await clean.fetchval("SELECT count(*) FROM processed_inbound") == 7
    assert set(replies.messages.values()) == {DEFAULT_HELP_REPLY}
    assert len(replies.messages) == 7
    assert "routing.batch_split" in caplog.text
