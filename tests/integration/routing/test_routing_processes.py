"""Acceptance: routing as a real process with real seller_admin, live_session and outbox
processes, PostgreSQL, NATS JetStream and the Twilio sandbox. Messages enter the `INBOUND`
stream exactly as the gateway publishes them."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
from nats.js import api
from snapsell.routing.v1 import events_pb2

from tests.integration.routing.fakes import SELLER, inbound
from tests.integration.routing.stack import TENANT, Stack, nats_connection
from tests.support.polling import eventually
from tools.dev_keys import DevKeys

_numbers = itertools.count(1)


def new_client() -> str:
    """A phone number no other test used, so caches and consent start clean."""
    return f"+3361{next(_numbers):07d}"


@pytest.fixture(scope="module")
async def stack(admin_dsn: str, nats_url: str, token_keys: DevKeys) -> AsyncIterator[Stack]:
    async with nats_connection(nats_url) as nats:
        stack = Stack(admin_dsn, nats, token_keys)
        try:
            await stack.start()
            yield stack
        finally:
            await stack.stop()


async def routed_events(stack: Stack, sids: list[str]) -> list[events_pb2.MessageRouted]:
    """The MessageRouted events JetStream holds for these MessageSids (after the relay)."""
    wanted = set(sids)
    subscription = await stack.js.pull_subscribe(
        "routing.v1.message.routed",
        stream="ROUTING_EVENTS",
        config=api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.NONE
        ),
    )
    found: list[events_pb2.MessageRouted] = []
    try:
        while True:
            try:
                batch = await subscription.fetch(500, timeout=1.0)
            except TimeoutError:
                break
            for msg in batch:
                event = events_pb2.MessageRouted.FromString(msg.data)
                if event.message.message_sid in wanted:
                    found.append(event)
    finally:
        await subscription.unsubscribe()
    return found


async def relayed(stack: Stack, sids: list[str]) -> list[events_pb2.MessageRouted]:
    """The MessageRouted events of these messages, once the relay has published them all."""
    found: list[events_pb2.MessageRouted] = []

    async def all_there() -> bool:
        found[:] = await routed_events(stack, sids)
        return len(found) >= len(sids)

    await eventually(all_there, timeout_s=60)
    return found


async def count(stack: Stack, query: str, *args: object) -> int:
    return int(await stack.fetchval(query, *args))  # type: ignore[call-overload]


async def test_stop_records_one_opt_out_one_event_and_one_confirmation(stack: Stack) -> None:
    client = new_client()
    message = inbound("STOP", sender=client)
    await stack.publish(message)
    await stack.wait_processed([message.message_sid])
    assert (
        await count(stack, "SELECT count(*) FROM routing.opt_outs WHERE address = $1", client) == 1
    )
    assert (
        await count(
            stack,
            "SELECT count(*) FROM routing.events WHERE subject = 'routing.v1.opt_out.recorded'"
            " AND aggregate_id = $1",
            f"whatsapp:{client}",
        )
        == 1
    )
    key = f"{message.message_sid}:consent"
    assert (
        await count(
            stack,
            "SELECT count(*) FROM outbox.messages"
            " WHERE idempotency_key = $1 AND kind = 'compliance'",
            key,
        )
        == 1
    )

    async def confirmation_sent() -> bool:
        status = await stack.fetchval(
            "SELECT status FROM outbox.messages WHERE idempotency_key = $1", key
        )
        return status in ("sent", "delivered", "read")

    # COMPLIANCE goes out although the recipient has just opted out.
    await eventually(confirmation_sent, timeout_s=30)


async def test_start_removes_the_opt_out_and_confirms(stack: Stack) -> None:
    client = new_client()
    stop, start = inbound("STOP", sender=client), inbound("start", sender=client)
    await stack.publish(stop)
    await stack.wait_processed([stop.message_sid])
    await stack.publish(start)
    await stack.wait_processed([start.message_sid])
    assert (
        await count(stack, "SELECT count(*) FROM routing.opt_outs WHERE address = $1", client) == 0
    )
    assert (
        await count(
            stack,
            "SELECT count(*) FROM routing.events WHERE subject = 'routing.v1.opt_out.removed'"
            " AND aggregate_id = $1",
            f"whatsapp:{client}",
        )
        == 1
    )
    assert (
        await count(
            stack,
            "SELECT count(*) FROM outbox.messages WHERE idempotency_key = $1",
            f"{start.message_sid}:consent",
        )
        == 1
    )


async def test_help_enqueues_the_help_reply(stack: Stack) -> None:
    message = inbound("HELP", sender=new_client())
    await stack.publish(message)
    await stack.wait_processed([message.message_sid])
    body = await stack.fetchval(
        "SELECT body FROM outbox.messages WHERE idempotency_key = $1",
        f"{message.message_sid}:consent",
    )
    assert isinstance(body, str) and "STOP" in body


async def test_salut_touches_no_session_and_a_client_code_only_extends_one(stack: Stack) -> None:
    active = "SELECT count(*) FROM live_session.sessions WHERE tenant_id = $1 AND status = 'active'"
    await stack.fetchval(  # end whatever live an earlier test left open
        "UPDATE live_session.sessions SET status = 'closed', closed_at = now(),"
        " close_reason = 'manual' WHERE tenant_id = $1 AND status = 'active' RETURNING 1",
        TENANT,
    )
    salut = inbound("salut", sender=new_client())
    early = inbound("A12", sender=new_client())
    for message in (salut, early):
        await stack.publish(message)
    await stack.wait_processed([salut.message_sid, early.message_sid])
    assert await count(stack, active, TENANT) == 0  # a client's code opens no live
    seller = inbound("Robe rouge T38, 25 euros, code A12", sender=SELLER)
    await stack.publish(seller)
    await stack.wait_processed([seller.message_sid])
    code = inbound("A12", sender=new_client())
    await stack.publish(code)
    await stack.wait_processed([code.message_sid])
    session_id = await stack.fetchval(
        "SELECT live_session_id FROM routing.processed_inbound WHERE message_sid = $1",
        code.message_sid,
    )
    assert session_id
    assert (
        await count(
            stack,
            "SELECT count(*) FROM live_session.sessions WHERE id::text = $1 AND status = 'active'",
            session_id,
        )
        == 1
    )
    [event] = await relayed(stack, [code.message_sid])
    assert event.live_session_id == session_id
    assert event.decision == events_pb2.ROUTING_DECISION_LIVE_SIGNAL
    [event] = await relayed(stack, [seller.message_sid])
    assert event.live_session_id == session_id
    [event] = await relayed(stack, [early.message_sid])
    assert event.decision == events_pb2.ROUTING_DECISION_LIVE_SIGNAL and not event.live_session_id
    [event] = await relayed(stack, [salut.message_sid])
    assert event.decision == events_pb2.ROUTING_DECISION_CONVERSATION and not event.live_session_id


async def test_a_seller_message_is_routed_as_the_sellers(stack: Stack) -> None:
    message = inbound("Robe rouge T38, 25 euros, code B7", sender=SELLER)
    await stack.publish(message)
    await stack.wait_processed([message.message_sid])
    [event] = await relayed(stack, [message.message_sid])
    assert event.tenant_id == TENANT and event.live_session_id


async def test_a_webhook_published_again_and_again_has_one_effect(stack: Stack) -> None:
    message = inbound("STOP", sender=new_client())
    for _ in range(5):  # inside the duplicate window: JetStream keeps one
        await stack.publish(message)
    for copy in range(2):  # "after the window": a different Nats-Msg-Id gets through
        await stack.publish(message, msg_id=f"{message.message_sid}/late-{copy}")
    sids = [message.message_sid]
    await stack.wait_processed(sids)
    await asyncio.sleep(1.5)  # let the late copies be consumed too
    assert await stack.processed(sids) == 1
    assert (
        await count(stack, "SELECT count(*) FROM routing.opt_outs WHERE message_sid = $1", sids[0])
        == 1
    )
    assert (
        await count(
            stack,
            "SELECT count(*) FROM outbox.messages WHERE correlation_id = $1",
            message.message_sid,
        )
        == 1
    )
    await relayed(stack, sids)
    await asyncio.sleep(0.5)
    assert len(await routed_events(stack, sids)) == 1


@pytest.mark.parametrize(("peer", "body"), [("seller_admin", "A12"), ("live_session", "C3")])
async def test_messages_wait_while_a_peer_is_down_and_are_processed_once(
    stack: Stack, peer: str, body: str
) -> None:
    await stack.stop_service(peer)
    messages = [inbound(body, sender=new_client()) for _ in range(20)]
    try:
        for message in messages:
            await stack.publish(message)
        await asyncio.sleep(3)
        assert await stack.processed([m.message_sid for m in messages]) == 0
    finally:
        await stack.restart(peer)
    sids = [m.message_sid for m in messages]
    await stack.wait_processed(sids)
    events = await relayed(stack, sids)
    assert len(events) == 20
    if peer == "live_session":  # each routed with the live session that was unreachable
        assert all(e.live_session_id for e in events)


async def test_routing_killed_mid_stream_processes_every_message_exactly_once(
    stack: Stack,
) -> None:
    stops = [inbound("STOP", sender=new_client()) for _ in range(300)]
    messages = [
        *(inbound("A12", sender=new_client()) for _ in range(1000)),
        *(inbound(f"Article {n} en vente", sender=SELLER) for n in range(400)),
        *stops,
        *(inbound("salut", sender=new_client()) for _ in range(300)),
    ]
    sids = [m.message_sid for m in messages]
    for start in range(0, len(messages), 200):
        await asyncio.gather(*(stack.publish(m) for m in messages[start : start + 200]))

    async def partly_done() -> bool:
        return await stack.processed(sids) >= 300

    await eventually(partly_done, timeout_s=60)
    await stack.kill("routing")
    done_at_kill = await stack.processed(sids)
    assert done_at_kill < len(sids), "routing finished before it could be killed"
    await stack.restart("routing")
    await stack.wait_processed(sids, timeout_s=180)

    assert await stack.processed(sids) == 2000
    assert (
        await count(
            stack,
            "SELECT count(*) FROM routing.events WHERE subject = 'routing.v1.message.routed'"
            " AND aggregate_id = ANY($1)",
            sids,
        )
        == 2000
    )
    stop_sids = [m.message_sid for m in stops]
    assert (
        await count(
            stack, "SELECT count(*) FROM routing.opt_outs WHERE message_sid = ANY($1)", stop_sids
        )
        == 300
    )
    assert (
        await count(
            stack,
            "SELECT count(*) FROM outbox.messages WHERE correlation_id = ANY($1)",
            sids,
        )
        == 300
    )

    events = await relayed(stack, sids)
    await asyncio.sleep(0.5)  # a relay re-publish would show up now
    events = await routed_events(stack, sids)
    assert len(events) == 2000
    assert len({e.message.message_sid for e in events}) == 2000
