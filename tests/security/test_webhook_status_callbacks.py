"""Twilio status callbacks, as the gateway publishes them, applied by a real outbox process:
a callback signed for another account moves nothing, and a callback for a SID the outbox never
sent is given up after a short grace instead of being redelivered for minutes."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families
from snapsell.gateway.v1.events_pb2 import StatusReceived

from infra import jetstream
from infra.streams import INBOUND_STATUS_SUBJECT, inbound_stream
from services.outbox.consumer import STATUS_CONSUMER
from tests.integration.outbox.stack import (
    ACCOUNT_SID,
    OutboxStack,
    new_phone,
    sms,
)
from tests.support.polling import eventually
from tools.dev_keys import DevKeys
from tools.stack import RunningService

OTHER_ACCOUNT_SID = "AC" + "6" * 32


@pytest.fixture(scope="module")
async def stack(admin_dsn: str, nats_url: str, token_keys: DevKeys) -> AsyncIterator[OutboxStack]:
    running = OutboxStack(admin_dsn, nats_url, token_keys)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def outbox(stack: OutboxStack) -> RunningService:
    return await stack.start_outbox()


async def publish_callback(stack: OutboxStack, sid: str, status: str, account_sid: str) -> None:
    assert stack.nats is not None
    js = stack.nats.jetstream()
    await jetstream.ensure_stream(js, inbound_stream())
    received = Timestamp()
    received.FromDatetime(datetime.now(UTC))
    event = StatusReceived(
        message_sid=sid, account_sid=account_sid, message_status=status, received_at=received
    )
    await jetstream.publish(
        js,
        INBOUND_STATUS_SUBJECT,
        event.SerializeToString(),
        msg_id=f"{sid}:{status}:{account_sid}",
    )


async def callbacks_settled(stack: OutboxStack) -> bool:
    """Every status callback published so far was acked or terminated."""
    assert stack.nats is not None
    info = await stack.nats.jetstream().consumer_info(
        STATUS_CONSUMER.stream, STATUS_CONSUMER.durable
    )
    return info.num_pending == 0 and info.num_ack_pending == 0


async def callbacks_counted(outbox: RunningService, effect: str) -> float:
    port = outbox.env["METRICS_PORT"]
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "snapsell_outbox_status_callbacks_total"
                and sample.labels.get("effect") == effect
            ):
                return sample.value
    return 0.0


async def test_status_callback_for_another_account_does_not_move_the_message(
    stack: OutboxStack, outbox: RunningService
) -> None:
    message_id = await stack.enqueue(recipient=sms(new_phone()), body="order 7 shipped")
    await stack.wait_status(message_id, "sent")
    sid = (await stack.get(message_id)).twilio_sid

    await publish_callback(stack, sid, "read", OTHER_ACCOUNT_SID)
    await publish_callback(stack, sid, "delivered", ACCOUNT_SID)
    await stack.wait_status(message_id, "delivered", "read")
    await eventually(lambda: callbacks_settled(stack), timeout_s=15)

    assert await stack.status_of(message_id) == "delivered"
    assert await callbacks_counted(outbox, "wrong_account") == 1


async def test_status_callback_for_an_unknown_sid_is_given_up_after_a_short_grace(
    stack: OutboxStack, outbox: RunningService
) -> None:
    before = await callbacks_counted(outbox, "unknown_sid")
    started = time.monotonic()
    await publish_callback(stack, "SM" + uuid.uuid4().hex, "delivered", ACCOUNT_SID)
    await eventually(lambda: callbacks_settled(stack), timeout_s=25, every_s=0.25)
    assert time.monotonic() - started < 25  # not ~60 deliveries over five minutes
    assert await callbacks_counted(outbox, "unknown_sid") == before + 1
