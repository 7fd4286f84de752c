"""The critical flows through the real front door: a signed Twilio webhook into the gateway,
every service its own process, the Twilio sandbox standing in for Twilio's REST API.

The live-session tests come first and last on purpose: the sweeper needs the session idle for
a whole window (1 minute, the shortest allowed) and the other flows run meanwhile. Run alone,
the last test still passes; it just waits the full window."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from snapsell.live_session.v1 import events_pb2 as session_events
from snapsell.live_session.v1 import live_session_pb2
from snapsell.outbox.v1 import events_pb2 as outbox_events
from snapsell.outbox.v1 import outbox_pb2
from snapsell.routing.v1 import events_pb2 as routing_events

from tests.e2e.conftest import LIVE_WINDOW_S
from tests.e2e.harness import Harness, Shop, new_business_number, new_mobile
from tests.support.polling import eventually

OPT_OUT_REPLY_START = "Vous êtes désinscrit(e)"
OPT_IN_REPLY_START = "Vous êtes réinscrit(e)"


async def routed(harness: Harness, message_sid: str) -> routing_events.MessageRouted:
    """Routing's verdict on one inbound message, once it committed."""
    found = await harness.wait_event(
        "ROUTING_EVENTS",
        "routing.v1.message.routed",
        routing_events.MessageRouted,
        lambda event: event.message.message_sid == message_sid,
    )
    return found[0]


async def sent_to(harness: Harness, phone: str, count: int) -> list[str]:
    """The bodies the sandbox accepted for `phone`, once there are `count` of them."""

    async def enough() -> list[str] | None:
        bodies = [str(m["body"]) for m in await harness.sandbox_sent(f"whatsapp:{phone}")]
        return bodies if len(bodies) >= count else None

    return list(await eventually(enough))


# --- live session, part 1 -------------------------------------------------------------------


@dataclass(frozen=True)
class LiveFlow:
    opened: live_session_pb2.LiveSession
    created_event: session_events.LiveSessionCreated
    after_code: live_session_pb2.LiveSession
    code_routing: routing_events.MessageRouted
    after_greeting: live_session_pb2.LiveSession
    greeting_routing: routing_events.MessageRouted


@pytest.fixture(scope="module")
async def live_flow(harness: Harness, api_shop: Shop) -> LiveFlow:
    """A seller's message, then a client's `A12`, then a client's "salut", as they happen."""
    client = new_mobile()
    seller_sid = await harness.send(api_shop, api_shop.seller, "Live ce soir 20h, nouveautés !")
    await routed(harness, seller_sid)
    opened = await harness.current_session(api_shop)
    assert opened is not None
    created = await harness.wait_event(
        "LIVE_SESSION_EVENTS",
        "live_session.v1.session.created",
        session_events.LiveSessionCreated,
        lambda event: event.tenant_id == api_shop.tenant_id,
    )
    code_sid = await harness.send(api_shop, client, "A12")
    code_routing = await routed(harness, code_sid)
    after_code = await harness.current_session(api_shop)
    greeting_sid = await harness.send(api_shop, client, "salut")
    greeting_routing = await routed(harness, greeting_sid)
    after_greeting = await harness.current_session(api_shop)
    assert after_code is not None and after_greeting is not None
    return LiveFlow(opened, created[0], after_code, code_routing, after_greeting, greeting_routing)


async def test_seller_message_opens_a_session_a_code_reuses_it_a_greeting_changes_nothing(
    live_flow: LiveFlow,
) -> None:
    opened = live_flow.opened
    assert opened.status == live_session_pb2.SESSION_STATUS_ACTIVE
    assert live_flow.created_event.session_id == opened.session_id
    assert live_flow.created_event.signal_kind == live_session_pb2.SIGNAL_KIND_SELLER_MESSAGE

    assert live_flow.code_routing.decision == routing_events.ROUTING_DECISION_LIVE_SIGNAL
    assert live_flow.code_routing.live_session_id == opened.session_id
    assert not live_flow.code_routing.live_session_created
    assert live_flow.after_code.session_id == opened.session_id
    code_activity = live_flow.after_code.last_activity_at.ToDatetime()
    assert code_activity > opened.last_activity_at.ToDatetime()

    assert live_flow.greeting_routing.decision == routing_events.ROUTING_DECISION_CONVERSATION
    assert live_flow.greeting_routing.live_session_id == ""
    assert live_flow.after_greeting.session_id == opened.session_id
    assert live_flow.after_greeting.last_activity_at.ToDatetime() == code_activity


# --- consent -------------------------------------------------------------------------------


async def test_stop_blocks_outbound_messages_until_start(harness: Harness, cli_shop: Shop) -> None:
    client = new_mobile()

    await harness.send(cli_shop, client, "STOP")
    await eventually(lambda: _opted_out(harness, cli_shop, client))
    [confirmation] = await sent_to(harness, client, 1)
    assert confirmation.startswith(OPT_OUT_REPLY_START)

    blocked_id = await harness.enqueue(cli_shop, client, "Nouvel arrivage : robe A12 à 25 €")
    blocked = await harness.wait_status(cli_shop, blocked_id, outbox_pb2.MESSAGE_STATUS_BLOCKED)
    assert blocked.attempt_count == 0 and not blocked.twilio_sid
    [event] = await harness.wait_event(
        "OUTBOX_EVENTS",
        "outbox.v1.message.blocked_optout",
        outbox_events.MessageBlockedOptOut,
        lambda event: event.message_id == blocked_id,
    )
    assert (event.tenant_id, event.recipient.value) == (cli_shop.tenant_id, client)
    assert await harness.metric("outbox", "snapsell_outbox_blocked_optout_total") >= 1

    await harness.send(cli_shop, client, "START")
    await eventually(lambda: _opted_in(harness, cli_shop, client))
    assert (await sent_to(harness, client, 2))[1].startswith(OPT_IN_REPLY_START)

    sent_id = await harness.enqueue(cli_shop, client, "Bon retour ! Le live reprend à 20 h")
    sent = await harness.wait_status(cli_shop, sent_id, outbox_pb2.MESSAGE_STATUS_SENT)
    bodies = await sent_to(harness, client, 3)
    assert bodies[2] == "Bon retour ! Le live reprend à 20 h"
    assert "Nouvel arrivage : robe A12 à 25 €" not in bodies
    assert sent.twilio_sid.startswith("SM") and sent.attempt_count == 1


async def _opted_out(harness: Harness, shop: Shop, phone: str) -> bool:
    return phone in await harness.opted_out(shop)


async def _opted_in(harness: Harness, shop: Shop, phone: str) -> bool:
    return phone not in await harness.opted_out(shop)


# --- delivery ------------------------------------------------------------------------------


async def test_sent_message_ends_delivered_then_read_from_signed_callbacks(
    harness: Harness, cli_shop: Shop
) -> None:
    client = new_mobile()
    # The client wrote first: a free-form WhatsApp reply is allowed within 24 hours.
    await routed(harness, await harness.send(cli_shop, client, "Bonjour, la robe est dispo ?"))
    message_id = await harness.enqueue(cli_shop, client, "Oui ! Taille M, 25 €")
    sent = await harness.wait_status(cli_shop, message_id, outbox_pb2.MESSAGE_STATUS_SENT)
    accepted_before = await _status_webhooks_accepted(harness)

    # Twilio's callbacks, signed by the sandbox, posted to the gateway's public URL.
    assert await harness.sandbox_callback(sent.twilio_sid, "delivered") == 200
    await harness.wait_status(cli_shop, message_id, outbox_pb2.MESSAGE_STATUS_DELIVERED)
    assert await harness.sandbox_callback(sent.twilio_sid, "read") == 200
    read = await harness.wait_status(cli_shop, message_id, outbox_pb2.MESSAGE_STATUS_READ)
    assert read.twilio_status == "read"
    # Twilio does not promise order: a late `sent` changes nothing, statuses only move forward.
    ignored_before = await _callbacks(harness, "ignored")
    assert await harness.sandbox_callback(sent.twilio_sid, "sent") == 200
    await eventually(lambda: _callbacks_above(harness, "ignored", ignored_before))
    assert (await harness.message(cli_shop, message_id)).status == outbox_pb2.MESSAGE_STATUS_READ

    changes = await harness.wait_event(
        "OUTBOX_EVENTS",
        "outbox.v1.message.status_changed",
        outbox_events.MessageStatusChanged,
        lambda event: event.message_id == message_id,
        count=2,
    )
    assert [(c.previous_status, c.status) for c in changes] == [
        (outbox_pb2.MESSAGE_STATUS_SENT, outbox_pb2.MESSAGE_STATUS_DELIVERED),
        (outbox_pb2.MESSAGE_STATUS_DELIVERED, outbox_pb2.MESSAGE_STATUS_READ),
    ]
    assert await _status_webhooks_accepted(harness) == accepted_before + 3
    # Twilio retrying a callback gets its 200 again; JetStream drops the copy.
    assert await harness.sandbox_callback(sent.twilio_sid, "read") == 200
    assert (await harness.message(cli_shop, message_id)).status == outbox_pb2.MESSAGE_STATUS_READ


async def _status_webhooks_accepted(harness: Harness) -> float:
    return await harness.metric(
        "gateway", "snapsell_gateway_webhook_requests_total", endpoint="status", outcome="accepted"
    )


async def _callbacks(harness: Harness, effect: str) -> float:
    return await harness.metric("outbox", "snapsell_outbox_status_callbacks_total", effect=effect)


async def _callbacks_above(harness: Harness, effect: str, before: float) -> bool:
    return await _callbacks(harness, effect) > before


# --- unknown receiving number -------------------------------------------------------------


async def test_message_to_an_unknown_number_is_acknowledged_and_recorded_unroutable(
    harness: Harness, cli_shop: Shop
) -> None:
    stranger = Shop("nobody", new_business_number(), "", "")
    message_sid = await harness.send(stranger, new_mobile(), "A12")  # asserts 200 + TwiML
    [event] = await harness.wait_event(
        "ROUTING_EVENTS",
        "routing.v1.message.unroutable",
        routing_events.MessageUnroutable,
        lambda event: event.message.message_sid == message_sid,
    )
    assert event.reason == routing_events.UNROUTABLE_REASON_UNKNOWN_CHANNEL
    assert event.message.recipient.value == stranger.number


# --- duplicates ----------------------------------------------------------------------------


async def test_webhook_delivered_three_times_has_one_effect(
    harness: Harness, cli_shop: Shop
) -> None:
    client = new_mobile()
    params = harness.inbound(cli_shop, client, "STOP")
    message_sid = params["MessageSid"]
    # Twilio retrying a webhook whose 200 it did not see, twice at once, then once more late.
    first = await asyncio.gather(harness.post_webhook(params), harness.post_webhook(params))
    await sent_to(harness, client, 1)
    last = await harness.post_webhook(params)
    assert [r.status_code for r in (*first, last)] == [200, 200, 200]

    await asyncio.sleep(1.5)  # time for a second effect to show, if there were one
    assert len(await sent_to(harness, client, 1)) == 1
    routings = await harness.events(
        "ROUTING_EVENTS",
        "routing.v1.message.routed",
        routing_events.MessageRouted,
        lambda event: event.message.message_sid == message_sid,
    )
    opt_outs = await harness.events(
        "ROUTING_EVENTS",
        "routing.v1.opt_out.recorded",
        routing_events.OptOutChanged,
        lambda event: event.message_sid == message_sid,
    )
    assert (len(routings), len(opt_outs)) == (1, 1)
    assert client in await harness.opted_out(cli_shop)


# --- live session, part 2 (last: it waits for the window to pass) ---------------------------


async def test_sweeper_closes_the_idle_session_and_records_it(
    harness: Harness, api_shop: Shop, live_flow: LiveFlow
) -> None:
    session_id = live_flow.opened.session_id

    async def closed() -> live_session_pb2.LiveSession | None:
        # Not GetCurrentSession: it stops showing a session as soon as the window passed,
        # before the sweeper closes it.
        for session in await harness.sessions(api_shop):
            if session.session_id == session_id and session.closed_at.seconds:
                return session
        return None

    session = await eventually(closed, timeout_s=LIVE_WINDOW_S + 30, every_s=0.5)
    assert session.status == live_session_pb2.SESSION_STATUS_CLOSED
    assert session.close_reason == live_session_pb2.CLOSE_REASON_IDLE
    idle_for = session.closed_at.ToDatetime() - session.last_activity_at.ToDatetime()
    assert idle_for.total_seconds() >= LIVE_WINDOW_S
    assert await harness.current_session(api_shop) is None
    [event] = await harness.wait_event(
        "LIVE_SESSION_EVENTS",
        "live_session.v1.session.closed",
        session_events.LiveSessionClosed,
        lambda event: event.session_id == session_id,
    )
    assert event.reason == live_session_pb2.CLOSE_REASON_IDLE
    assert event.tenant_id == api_shop.tenant_id
    assert await harness.metric("live_session", "snapsell_live_session_idle_closed_total") >= 1
