"""WhatsApp's 24-hour rule with routing's real record of inbound messages: a client's message
goes through routing (tenant resolved by seller_admin), and the outbox's free-form reply is
sent inside the window and dead-lettered outside it, without asking Twilio."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from snapsell.outbox.v1 import outbox_pb2

from tests.integration.outbox.stack import (
    WHATSAPP_SENDER,
    OutboxStack,
    new_phone,
    whatsapp,
)
from tests.support.polling import eventually
from tools.dev_keys import DevKeys


@pytest.fixture(scope="module")
async def stack(admin_dsn: str, nats_url: str, token_keys: DevKeys) -> AsyncIterator[OutboxStack]:
    running = OutboxStack(admin_dsn, nats_url, token_keys)
    try:
        await running.start()
        await running.start_outbox()
        yield running
    finally:
        await running.stop()


async def wrote_to_the_shop(stack: OutboxStack, phone: str, hours_ago: float) -> None:
    at = datetime.now(UTC) - timedelta(hours=hours_ago)
    await stack.publish_inbound(phone, "hello, is the blue dress still available?", at)

    async def routing_saw_it() -> bool:
        return (await stack.check_opt_out(whatsapp(phone))).HasField("last_inbound_at")

    await eventually(routing_saw_it, timeout_s=20, every_s=0.2)


async def test_a_free_form_reply_inside_the_window_is_sent(stack: OutboxStack) -> None:
    phone = new_phone()
    await wrote_to_the_shop(stack, phone, hours_ago=23)
    message_id = await stack.enqueue(
        sender=WHATSAPP_SENDER, recipient=whatsapp(phone), body="yes, size M is left"
    )
    await stack.wait_status(message_id, "sent")
    [sent] = await stack.sandbox_messages(to=f"whatsapp:{phone}")
    assert sent["body"] == "yes, size M is left" and sent["from"] == WHATSAPP_SENDER


async def test_a_free_form_reply_after_the_window_is_dead_lettered(stack: OutboxStack) -> None:
    phone = new_phone()
    await wrote_to_the_shop(stack, phone, hours_ago=25)
    message_id = await stack.enqueue(
        sender=WHATSAPP_SENDER, recipient=whatsapp(phone), body="still interested?"
    )
    await stack.wait_status(message_id, "dead")
    message = await stack.get(message_id)
    assert message.dead_reason == outbox_pb2.DEAD_REASON_OUTSIDE_SESSION_WINDOW
    assert await stack.sandbox_messages(to=f"whatsapp:{phone}") == []
