"""The routing use case against a real PostgreSQL, with small fakes for the peers: one effect per
MessageSid, consent keywords, live signals, unknown channels, peer failures."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest
from snapsell.routing.v1 import events_pb2

from services.routing.clients import PeerUnavailableError
from services.routing.domain import (
    DEFAULT_HELP_REPLY,
    DEFAULT_OPT_IN_REPLY,
    DEFAULT_OPT_OUT_REPLY,
    DecisionKind,
    LiveSignalKind,
    RulesBook,
)
from services.routing.inbound import InboundRouter, InvalidInboundError, RouteOutcome
from tests.integration.routing.fakes import (
    SELLER,
    FakeReplies,
    FakeSenders,
    FakeSessions,
    inbound,
    minutes_ago,
)


@pytest.fixture
def senders() -> FakeSenders:
    return FakeSenders()


@pytest.fixture
def sessions() -> FakeSessions:
    return FakeSessions()


@pytest.fixture
def replies() -> FakeReplies:
    return FakeReplies()


@pytest.fixture
def router(
    clean: asyncpg.Pool, senders: FakeSenders, sessions: FakeSessions, replies: FakeReplies
) -> InboundRouter:
    return InboundRouter(
        clean, senders=senders, sessions=sessions, replies=replies, rules=RulesBook()
    )


async def events(pool: asyncpg.Pool, subject: str) -> list[bytes]:
    rows = await pool.fetch("SELECT payload FROM events WHERE subject = $1 ORDER BY id", subject)
    return [row["payload"] for row in rows]


async def count(pool: asyncpg.Pool, table: str) -> int:
    return await pool.fetchval(f"SELECT count(*) FROM {table}")


async def test_the_opt_out_row_and_event_hold_the_keyword_as_matched_not_as_typed(
    router: InboundRouter, clean: asyncpg.Pool
) -> None:
    # The contract (OptOut.keyword, OptOutChanged.keyword) says "as matched": `Stop !` is STOP.
    await router.route(inbound("Stop !"), stream_sequence=1)
    assert await clean.fetchval("SELECT keyword FROM opt_outs") == "STOP"
    [payload] = await events(clean, "routing.v1.opt_out.recorded")
    assert events_pb2.OptOutChanged.FromString(payload).keyword == "STOP"


async def test_stop_records_one_opt_out_one_event_and_one_confirmation(
    router: InboundRouter, clean: asyncpg.Pool, replies: FakeReplies, sessions: FakeSessions
) -> None:
    message = inbound("STOP")
    routed = await router.route(message, stream_sequence=1)
    assert routed.outcome is RouteOutcome.ROUTED
    assert routed.decision is not None and routed.decision.kind is DecisionKind.OPT_OUT
    assert await count(clean, "opt_outs") == 1
    [payload] = await events(clean, "routing.v1.opt_out.recorded")
    changed = events_pb2.OptOutChanged.FromString(payload)
    assert changed.message_sid == message.message_sid and changed.keyword == "STOP"
    assert replies.messages == {("shop-1", f"{message.message_sid}:consent"): DEFAULT_OPT_OUT_REPLY}
    assert sessions.touches == []
    [payload] = await events(clean, "routing.v1.message.routed")
    routed_event = events_pb2.MessageRouted.FromString(payload)
    assert routed_event.decision == events_pb2.ROUTING_DECISION_OPT_OUT
    assert routed_event.message == message


async def test_the_same_message_again_has_no_second_effect(
    router: InboundRouter, clean: asyncpg.Pool, replies: FakeReplies, senders: FakeSenders
) -> None:
    message = inbound("STOP")
    await router.route(message, stream_sequence=1)
    for sequence in range(2, 6):
        assert (await router.route(message, stream_sequence=sequence)).outcome is (
            RouteOutcome.DUPLICATE
        )
    assert senders.calls == 1  # duplicates are dropped before any peer call
    assert await count(clean, "processed_inbound") == 1
    assert await count(clean, "events") == 2  # opt_out.recorded + message.routed
    assert replies.calls == 1


async def test_copies_processed_concurrently_have_one_effect(
    router: InboundRouter, clean: asyncpg.Pool, replies: FakeReplies
) -> None:
    message = inbound("STOP")
    outcomes = await asyncio.gather(
        *(router.route(message, stream_sequence=i) for i in range(1, 6))
    )
    assert sorted(o.outcome.value for o in outcomes).count("routed") == 1
    assert await count(clean, "opt_outs") == 1
    assert await count(clean, "consent_log") == 1
    assert len(await events(clean, "routing.v1.message.routed")) == 1
    assert len(replies.messages) == 1


async def test_start_removes_the_opt_out_and_confirms(
    router: InboundRouter, clean: asyncpg.Pool, replies: FakeReplies
) -> None:
    await router.route(inbound("STOP", at=minutes_ago(2)), stream_sequence=1)
    start = inbound("Start", at=minutes_ago(1))
    await router.route(start, stream_sequence=2)
    assert await count(clean, "opt_outs") == 0
    assert len(await events(clean, "routing.v1.opt_out.removed")) == 1
    assert replies.messages[("shop-1", f"{start.message_sid}:consent")] == DEFAULT_OPT_IN_REPLY


async def test_yes_from_someone_never_opted_out_changes_nothing_and_gets_no_reply(
    router: InboundRouter, clean: asyncpg.Pool, replies: FakeReplies
) -> None:
    routed = await router.route(inbound("yes"), stream_sequence=1)
    assert routed.decision is not None and routed.decision.kind is DecisionKind.OPT_IN
    assert replies.messages == {}
    assert await events(clean, "routing.v1.opt_out.removed") == []


async def test_help_enqueues_the_help_text(router: InboundRouter, replies: FakeReplies) -> None:
    message = inbound("aide")
    await router.route(message, stream_sequence=1)
    assert replies.messages == {("shop-1", f"{message.message_sid}:consent"): DEFAULT_HELP_REPLY}


async def test_a_client_item_code_alone_opens_no_live_session(
    router: InboundRouter, clean: asyncpg.Pool, sessions: FakeSessions
) -> None:
    message = inbound("A12")
    routed = await router.route(message, stream_sequence=1)
    assert sessions.touches == [("shop-1", LiveSignalKind.ITEM_CODE, message.message_sid)]
    assert routed.touched is None
    assert sessions.active == set()
    stored = await clean.fetchval(
        "SELECT live_session_id FROM processed_inbound WHERE message_sid = $1", message.message_sid
    )
    assert stored is None
    [payload] = await events(clean, "routing.v1.message.routed")
    assert events_pb2.MessageRouted.FromString(payload).live_session_id == ""


async def test_a_client_item_code_extends_the_session_a_seller_opened(
    router: InboundRouter, clean: asyncpg.Pool, sessions: FakeSessions
) -> None:
    seller = inbound("Nouveau : robe, code A12", sender=SELLER)
    opening = await router.route(seller, stream_sequence=1)
    assert opening.touched is not None and opening.touched.created
    message = inbound("A12")
    routed = await router.route(message, stream_sequence=2)
    assert sessions.touches[-1] == ("shop-1", LiveSignalKind.ITEM_CODE, message.message_sid)
    assert routed.touched is not None and not routed.touched.created
    stored = await clean.fetchval(
        "SELECT live_session_id FROM processed_inbound WHERE message_sid = $1", message.message_sid
    )
    assert stored == routed.touched.session_id
    _, payload = await events(clean, "routing.v1.message.routed")
    assert events_pb2.MessageRouted.FromString(payload).live_session_id == stored


@pytest.mark.parametrize("body", ["salut", "merci beaucoup", "STOP", ""])
async def test_small_talk_keywords_and_empty_messages_do_not_touch_a_session(
    router: InboundRouter, sessions: FakeSessions, body: str
) -> None:
    await router.route(inbound(body), stream_sequence=1)
    assert sessions.touches == []


async def test_a_seller_message_touches_the_live_session(
    router: InboundRouter, sessions: FakeSessions
) -> None:
    await router.route(inbound("Nouveau : robe rouge, code A12", sender=SELLER), stream_sequence=1)
    assert [signal for _, signal, _ in sessions.touches] == [LiveSignalKind.SELLER_MESSAGE]


async def test_the_last_inbound_time_is_committed_before_a_reply_is_enqueued(
    router: InboundRouter, clean: asyncpg.Pool, replies: FakeReplies
) -> None:
    """The outbox checks the reply against the 24-hour window, possibly before our commit."""
    replies.down = True
    with pytest.raises(PeerUnavailableError):
        await router.route(inbound("STOP"), stream_sequence=1)
    assert await count(clean, "last_inbound") == 1
    assert await count(clean, "processed_inbound") == 0
    assert await count(clean, "opt_outs") == 0


async def test_every_routed_message_updates_the_last_inbound_time(
    router: InboundRouter, clean: asyncpg.Pool
) -> None:
    message = inbound("bonjour, c'est combien ?")
    await router.route(message, stream_sequence=1)
    at = await clean.fetchval("SELECT last_inbound_at FROM last_inbound")
    assert at == message.received_at.ToDatetime().replace(tzinfo=at.tzinfo)


async def test_an_unknown_channel_is_recorded_as_unroutable_once(
    router: InboundRouter, clean: asyncpg.Pool
) -> None:
    message = inbound("A12", to="+15550000000")
    assert (await router.route(message, stream_sequence=9)).outcome is RouteOutcome.UNROUTABLE
    assert (await router.route(message, stream_sequence=10)).outcome is RouteOutcome.DUPLICATE
    [payload] = await events(clean, "routing.v1.message.unroutable")
    event = events_pb2.MessageUnroutable.FromString(payload)
    assert event.reason == events_pb2.UNROUTABLE_REASON_UNKNOWN_CHANNEL
    assert event.stream_sequence == 9


async def test_a_peer_failure_commits_nothing_and_the_retry_does_the_work(
    router: InboundRouter, clean: asyncpg.Pool, sessions: FakeSessions
) -> None:
    message = inbound("A12")
    sessions.down = True
    with pytest.raises(PeerUnavailableError):
        await router.route(message, stream_sequence=1)
    assert await count(clean, "processed_inbound") == 0
    assert await count(clean, "events") == 0
    sessions.down = False
    assert (await router.route(message, stream_sequence=1)).outcome is RouteOutcome.ROUTED
    assert await count(clean, "processed_inbound") == 1


async def test_a_crash_after_the_reply_was_enqueued_does_not_send_a_second_reply(
    router: InboundRouter, clean: asyncpg.Pool, replies: FakeReplies, senders: FakeSenders
) -> None:
    """The reply is enqueued inside the transaction; if the transaction then fails, the retry
    enqueues with the same key and the outbox returns the first message."""
    message = inbound("STOP")
    # The last write of the transaction, after the Enqueue, fails once.
    await clean.execute(
        "ALTER TABLE events ADD CONSTRAINT events_fail_once"
        " CHECK (subject <> 'routing.v1.message.routed') NOT VALID"
    )
    try:
        with pytest.raises(asyncpg.CheckViolationError):
            await router.route(message, stream_sequence=1)
    finally:
        await clean.execute("ALTER TABLE events DROP CONSTRAINT events_fail_once")
    assert await count(clean, "opt_outs") == 0
    await router.route(message, stream_sequence=1)
    assert replies.calls == 2 and len(replies.messages) == 1
    assert await count(clean, "opt_outs") == 1


async def test_an_older_stop_processed_after_a_newer_start_is_ignored_without_reply(
    router: InboundRouter, clean: asyncpg.Pool, replies: FakeReplies
) -> None:
    stop = inbound("STOP", at=minutes_ago(3))
    start = inbound("START", at=minutes_ago(2))
    later_stop = inbound("STOP", at=minutes_ago(1))
    await router.route(stop, stream_sequence=1)
    await router.route(later_stop, stream_sequence=3)
    await router.route(start, stream_sequence=2)  # older than later_stop: stale
    assert await count(clean, "opt_outs") == 1
    assert ("shop-1", f"{start.message_sid}:consent") not in replies.messages


async def test_a_reply_the_outbox_rejects_does_not_block_the_opt_out(
    router: InboundRouter, clean: asyncpg.Pool, replies: FakeReplies
) -> None:
    replies.reject = True
    assert (await router.route(inbound("STOP"), stream_sequence=1)).outcome is (RouteOutcome.ROUTED)
    assert await count(clean, "opt_outs") == 1


async def test_a_message_without_sid_or_addresses_is_invalid(router: InboundRouter) -> None:
    message = inbound("A12")
    message.message_sid = ""
    with pytest.raises(InvalidInboundError):
        await router.route(message, stream_sequence=1)
    message = inbound("A12")
    message.ClearField("sender")
    with pytest.raises(InvalidInboundError):
        await router.route(message, stream_sequence=1)


async def test_consent_keywords_from_twilio_advanced_opt_out_are_recorded_without_reply(
    router: InboundRouter, clean: asyncpg.Pool, replies: FakeReplies
) -> None:
    await router.route(inbound("Arrêtez", opt_out_type="STOP"), stream_sequence=1)
    assert await count(clean, "opt_outs") == 1
    assert replies.messages == {}


async def test_the_ledger_outlives_the_jetstream_duplicate_window(
    router: InboundRouter, clean: asyncpg.Pool
) -> None:
    message = inbound("A12", at=minutes_ago(60 * 24))
    await router.route(message, stream_sequence=1)
    await clean.execute(
        "UPDATE processed_inbound SET processed_at = processed_at - $1::interval",
        timedelta(days=1),
    )
    assert (await router.route(message, stream_sequence=99)).outcome is RouteOutcome.DUPLICATE
