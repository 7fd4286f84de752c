"""The outbox process end to end through its gRPC API, with routing's real consent ledger and
the Twilio sandbox: sending, consent, WhatsApp's window, dead letters, redrive, discard,
idempotency and status callbacks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.gateway.v1.events_pb2 import StatusReceived
from snapsell.outbox.v1 import events_pb2, outbox_pb2

from infra import jetstream
from infra.streams import INBOUND_STATUS_SUBJECT, inbound_stream
from tests.integration.outbox.stack import (
    ACCOUNT_SID,
    PUBLIC_BASE_URL,
    SMS_SENDER,
    TENANT,
    WHATSAPP_SENDER,
    OutboxStack,
    new_phone,
    next_event,
    sms,
    whatsapp,
)
from tests.support.jetstream import wait_settled
from tests.support.poison import UNKNOWN_ENUM, increase, publish_poison, rejected
from tests.support.polling import eventually
from tools.stack import RunningService

CONTENT_SID = "HX" + "1" * 32


@pytest.fixture(scope="module")
async def outbox(stack: OutboxStack) -> RunningService:
    return await stack.start_outbox()


@pytest.fixture(autouse=True)
async def clean_sandbox(stack: OutboxStack, outbox: RunningService) -> AsyncIterator[None]:
    await stack.reset_sandbox()
    yield


async def test_a_message_is_sent_once_with_the_status_callback_and_recorded(
    stack: OutboxStack,
) -> None:
    phone = new_phone()
    sent_events = await stack.watch("outbox.v1.message.sent")
    try:
        message_id = await stack.enqueue(recipient=sms(phone), body="your order is ready")
        await stack.wait_status(message_id, "sent")
        message = await stack.get(message_id)
        [accepted] = await stack.sandbox_messages(to=phone)
        assert message.status == outbox_pb2.MESSAGE_STATUS_SENT
        assert message.twilio_sid == accepted["sid"]
        assert accepted["from"] == SMS_SENDER and accepted["body"] == "your order is ready"
        assert accepted["status_callback"] == f"{PUBLIC_BASE_URL}/webhooks/twilio/status"
        assert [a.outcome for a in message.attempts] == [outbox_pb2.ATTEMPT_OUTCOME_ACCEPTED]
        relayed = await next_event(
            sent_events, events_pb2.MessageSent, lambda e: e.message_id == message_id
        )
        assert relayed.twilio_sid == accepted["sid"] and not relayed.reconciled
    finally:
        await sent_events.unsubscribe()


async def test_enqueue_is_idempotent_per_tenant_and_key(stack: OutboxStack) -> None:
    phone = new_phone()
    await stack.add_channels("another-shop", "+14155550101")
    first = await stack.enqueue(recipient=sms(phone), body="once", idempotency_key="stop:SM1")
    again = await stack.enqueue(recipient=sms(phone), body="once", idempotency_key="stop:SM1")
    other_tenant = await stack.enqueue(
        tenant_id="another-shop",
        sender="+14155550101",
        recipient=sms(phone),
        body="once",
        idempotency_key="stop:SM1",
    )
    assert first == again != other_tenant
    assert (
        await stack.count("SELECT count(*) FROM outbox.messages WHERE idempotency_key = 'stop:SM1'")
        == 2
    )
    await stack.wait_status(first, "sent")
    await stack.wait_status(other_tenant, "sent")
    assert len(await stack.sandbox_messages(to=phone)) == 2


async def test_enqueue_many_stores_each_valid_request_and_refuses_the_invalid_alone(
    stack: OutboxStack,
) -> None:
    phone, other = new_phone(), new_phone()
    first = await stack.enqueue(recipient=sms(phone), body="once", idempotency_key="many:1")
    requests = [
        outbox_pb2.EnqueueRequest(
            tenant_id=TENANT, sender=SMS_SENDER, recipient=sms(to), body="hi", idempotency_key=key
        )
        for to, key in ((phone, "many:1"), ("+3361234", "many:2"), (other, "many:3"))
    ]
    reply = await stack.outbox().EnqueueMany(
        outbox_pb2.EnqueueManyRequest(requests=requests), metadata=stack.metadata(), timeout=10
    )
    again, refused, created = reply.results
    assert (again.code, again.message_id, again.created) == (0, first, False)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not refused.message_id
    assert "is not an E.164 phone number" in refused.error
    assert created.code == 0 and created.created
    await stack.wait_status(created.message_id, "sent")
    assert len(await stack.sandbox_messages(to=other)) == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"recipient": sms("+3361234"), "body": "x"}, "is not an E.164 phone number"),
        ({"recipient": sms("+33612345678")}, "exactly one of body or template"),
        ({"recipient": sms("+33612345678"), "body": "x", "idempotency_key": ""}, "required"),
        ({"recipient": whatsapp("+33612345678"), "body": "x"}, 'must start with "whatsapp:"'),
        (
            {"recipient": sms("+33612345678"), "body": "x", "account_sid": "AC" + "0" * 32},
            "not configured",
        ),
    ],
)
async def test_invalid_messages_are_refused_with_the_reason(
    stack: OutboxStack, fields: dict[str, object], reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.enqueue(**fields)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (refused.value.details() or "")


async def test_tenant_roles_act_on_their_own_tenant_only(stack: OutboxStack) -> None:
    message_id = await stack.enqueue(recipient=sms(new_phone()), body="private")
    owner_elsewhere = stack.metadata("owner", "another-shop")
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stack.outbox().GetMessage(
            outbox_pb2.GetMessageRequest(tenant_id=TENANT, message_id=message_id),
            metadata=owner_elsewhere,
        )
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await stack.outbox().GetMessage(
            outbox_pb2.GetMessageRequest(message_id=message_id), metadata=owner_elsewhere
        )
    assert hidden.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as staff:
        await stack.outbox().Enqueue(
            outbox_pb2.EnqueueRequest(
                sender=SMS_SENDER, recipient=sms(new_phone()), body="x", idempotency_key="k"
            ),
            metadata=stack.metadata("staff", TENANT),
        )
    assert staff.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as compliance:
        await stack.outbox().Enqueue(
            outbox_pb2.EnqueueRequest(
                sender=SMS_SENDER,
                recipient=sms(new_phone()),
                body="you are unsubscribed",
                idempotency_key="k",
                kind=outbox_pb2.MESSAGE_KIND_COMPLIANCE,
            ),
            metadata=stack.metadata("owner", TENANT),
        )
    assert compliance.value.code() is grpc.StatusCode.PERMISSION_DENIED
    mine = await stack.outbox().GetMessage(
        outbox_pb2.GetMessageRequest(message_id=message_id),
        metadata=stack.metadata("staff", TENANT),
    )
    assert mine.message.message_id == message_id


async def test_an_opted_out_recipient_is_blocked_and_the_block_is_audited(
    stack: OutboxStack,
) -> None:
    phone = new_phone()
    await stack.opt_out(sms(phone))
    message_id = await stack.enqueue(recipient=sms(phone), body="flash sale tonight")
    await stack.wait_status(message_id, "blocked")
    assert await stack.sandbox_messages(to=phone) == []
    [payload] = await stack.recorded_events("outbox.v1.message.blocked_optout", message_id)
    event = events_pb2.MessageBlockedOptOut.FromString(payload)
    assert event.recipient.value == phone and event.HasField("opted_out_since")


async def test_compliance_messages_still_reach_an_opted_out_recipient(stack: OutboxStack) -> None:
    phone = new_phone()
    await stack.opt_out(sms(phone))
    message_id = await stack.enqueue(
        recipient=sms(phone),
        body="You are unsubscribed. Reply START to resubscribe.",
        kind=outbox_pb2.MESSAGE_KIND_COMPLIANCE,
    )
    await stack.wait_status(message_id, "sent")
    assert len(await stack.sandbox_messages(to=phone)) == 1


async def test_free_form_whatsapp_without_a_recent_inbound_message_is_dead_lettered(
    stack: OutboxStack,
) -> None:
    phone = new_phone()
    free_form = await stack.enqueue(
        sender=WHATSAPP_SENDER, recipient=whatsapp(phone), body="are you still interested?"
    )
    template = await stack.enqueue(
        sender=WHATSAPP_SENDER,
        recipient=whatsapp(phone),
        template=outbox_pb2.Template(content_sid=CONTENT_SID, variables={"1": "A12"}),
    )
    await stack.wait_status(free_form, "dead")
    await stack.wait_status(template, "sent")
    message = await stack.get(free_form)
    assert message.dead_reason == outbox_pb2.DEAD_REASON_OUTSIDE_SESSION_WINDOW
    assert list(message.attempts) == []  # Twilio was never asked
    [sent] = await stack.sandbox_messages(to=f"whatsapp:{phone}")
    assert sent["content_sid"] == CONTENT_SID and sent["content_variables"] == '{"1": "A12"}'


async def test_a_permanent_error_dead_letters_at_once_and_redrive_sends_it(
    stack: OutboxStack,
) -> None:
    phone = new_phone()
    await stack.set_faults(error_code_for={phone: 21211})
    message_id = await stack.enqueue(recipient=sms(phone), body="invoice attached")
    await stack.wait_status(message_id, "dead")
    dead = await stack.get(message_id)
    assert dead.dead_reason == outbox_pb2.DEAD_REASON_PERMANENT_ERROR
    assert dead.last_error_code == 21211 and dead.attempt_count == 1
    listed = await stack.outbox().ListDeadLetters(
        outbox_pb2.ListDeadLettersRequest(
            tenant_id=TENANT, reason=outbox_pb2.DEAD_REASON_PERMANENT_ERROR
        ),
        metadata=stack.metadata("manager", TENANT),
    )
    assert message_id in [m.message_id for m in listed.messages]

    await stack.set_faults()  # the number is fixed
    reply = await stack.outbox().Redrive(
        outbox_pb2.RedriveRequest(message_ids=[message_id]),
        metadata=stack.metadata("manager", TENANT),
    )
    assert list(reply.redriven_message_ids) == [message_id]
    await stack.wait_status(message_id, "sent")
    redriven = await stack.get(message_id)
    outcomes = [a.outcome for a in redriven.attempts]
    assert outcomes == [
        outbox_pb2.ATTEMPT_OUTCOME_PERMANENT_ERROR,
        outbox_pb2.ATTEMPT_OUTCOME_ACCEPTED,
    ]
    [audit] = await stack.recorded_events("outbox.v1.message.redriven", message_id)
    assert events_pb2.MessageRedriven.FromString(audit).actor == "test-manager"
    again = await stack.outbox().Redrive(
        outbox_pb2.RedriveRequest(tenant_id=TENANT, message_ids=[message_id]),
        metadata=stack.metadata("admin"),
    )
    assert list(again.skipped_message_ids) == [message_id]


async def test_an_unsubscribed_recipient_is_reported_to_routing_as_an_opt_out(
    stack: OutboxStack,
) -> None:
    phone = new_phone()
    await stack.set_faults(error_code_for={phone: 21610})
    message_id = await stack.enqueue(recipient=sms(phone), body="new arrivals")
    await stack.wait_status(message_id, "dead")
    [payload] = await stack.recorded_events("outbox.v1.recipient.unsubscribed", message_id)
    assert events_pb2.RecipientUnsubscribed.FromString(payload).recipient.value == phone

    async def routing_recorded_it() -> bool:
        return (await stack.check_opt_out(sms(phone))).opted_out

    await eventually(routing_recorded_it, timeout_s=15, every_s=0.2)
    await stack.set_faults()
    later = await stack.enqueue(recipient=sms(phone), body="more new arrivals")
    await stack.wait_status(later, "blocked")


async def test_dead_letters_are_paginated_newest_first_and_can_be_discarded(
    stack: OutboxStack,
) -> None:
    tenant = "shop-dead-letters"
    await stack.add_channels(tenant, "+14155550102")
    phones = [new_phone() for _ in range(5)]
    await stack.set_faults(error_code_for=dict.fromkeys(phones, 21211))
    ids = [
        await stack.enqueue(tenant_id=tenant, sender="+14155550102", recipient=sms(p), body=f"n{i}")
        for i, p in enumerate(phones)
    ]
    for message_id in ids:
        await stack.wait_status(message_id, "dead")
    manager = stack.metadata("manager", tenant)
    seen: list[str] = []
    token = ""
    while True:
        page = await stack.outbox().ListDeadLetters(
            outbox_pb2.ListDeadLettersRequest(page_size=2, page_token=token), metadata=manager
        )
        assert len(page.messages) <= 2
        seen += [m.message_id for m in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    reply = await stack.outbox().Discard(
        outbox_pb2.DiscardRequest(message_ids=ids[:2], reason="wrong numbers"), metadata=manager
    )
    assert sorted(reply.discarded_message_ids) == sorted(ids[:2])
    assert await stack.status_of(ids[0]) == "discarded"
    rest = await stack.outbox().ListDeadLetters(
        outbox_pb2.ListDeadLettersRequest(), metadata=manager
    )
    assert sorted(m.message_id for m in rest.messages) == sorted(ids[2:])


async def test_status_callbacks_move_a_message_forward_only(stack: OutboxStack) -> None:
    message_id = await stack.enqueue(recipient=sms(new_phone()), body="tracking number 42")
    await stack.wait_status(message_id, "sent")
    sid = (await stack.get(message_id)).twilio_sid
    assert stack.nats is not None
    js = stack.nats.jetstream()
    await jetstream.ensure_stream(js, inbound_stream())

    async def callback(status: str) -> None:
        received = Timestamp()
        received.FromDatetime(datetime.now(UTC))
        event = StatusReceived(
            message_sid=sid, account_sid=ACCOUNT_SID, message_status=status, received_at=received
        )
        await jetstream.publish(
            js, INBOUND_STATUS_SUBJECT, event.SerializeToString(), msg_id=f"{sid}:{status}"
        )

    await callback("delivered")
    await stack.wait_status(message_id, "delivered")
    for late in ("sent", "queued", "delivered"):  # duplicates and stragglers
        await callback(late)
    await callback("read")
    await stack.wait_status(message_id, "read")
    await callback("delivered")
    await callback("failed")

    async def all_consumed() -> bool:
        return (
            await stack.count(
                "SELECT count(*) FROM outbox.events WHERE aggregate_id = $1"
                " AND subject = 'outbox.v1.message.status_changed'",
                message_id,
            )
            >= 2
        )

    await eventually(all_consumed, timeout_s=30)
    await asyncio.sleep(1.0)  # let the stragglers be consumed too
    assert await stack.status_of(message_id) == "read"
    changes = [
        events_pb2.MessageStatusChanged.FromString(p)
        for p in await stack.recorded_events("outbox.v1.message.status_changed", message_id)
    ]
    assert [(c.previous_status, c.status) for c in changes] == [
        (outbox_pb2.MESSAGE_STATUS_SENT, outbox_pb2.MESSAGE_STATUS_DELIVERED),
        (outbox_pb2.MESSAGE_STATUS_DELIVERED, outbox_pb2.MESSAGE_STATUS_READ),
    ]


async def test_poison_status_callbacks_are_terminated_and_counted(
    stack: OutboxStack, outbox: RunningService
) -> None:
    """An undecodable callback, one with an unknown enum value and one over the size limit:
    terminated and counted by the running outbox, and the callback behind them applied."""
    message_id = await stack.enqueue(recipient=sms(new_phone()), body="poison ahead")
    await stack.wait_status(message_id, "sent")
    sid = (await stack.get(message_id)).twilio_sid
    assert stack.nats is not None
    js = stack.nats.jetstream()
    durable, metrics_url = (
        "outbox-status-callbacks",
        f"http://127.0.0.1:{outbox.env['METRICS_PORT']}/metrics",
    )

    def callback(status: str) -> StatusReceived:
        received = Timestamp()
        received.FromDatetime(datetime.now(UTC))
        return StatusReceived(
            message_sid=sid, account_sid=ACCOUNT_SID, message_status=status, received_at=received
        )

    async with httpx.AsyncClient() as http:
        before = rejected(durable, (await http.get(metrics_url)).text)
        unknown = callback("delivered")
        unknown.sender.channel = UNKNOWN_ENUM  # type: ignore[assignment]
        await publish_poison(js, INBOUND_STATUS_SUBJECT, unknown.SerializeToString(), sid)
        await jetstream.publish(
            js,
            INBOUND_STATUS_SUBJECT,
            callback("delivered").SerializeToString(),
            msg_id=f"{sid}:ok",
        )
        await stack.wait_status(message_id, "delivered")
        await wait_settled(js, "INBOUND", durable, INBOUND_STATUS_SUBJECT)
        after = rejected(durable, (await http.get(metrics_url)).text)
    assert increase(before, after) == {"undecodable": 1, "unknown_enum": 1}
    info = await js.consumer_info("INBOUND", durable)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
