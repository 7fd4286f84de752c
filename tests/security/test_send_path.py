"""Tenant isolation on the send path: a shop may send only from its own channels (numbers,
Messaging Services, their accounts) as seller_admin lists them, and only routing may enqueue the
COMPLIANCE messages that reach opted-out people.

The attacker is the owner of TENANT (or a service other than routing); the victim is another
shop whose channels are on a second Twilio account the outbox is configured for, so nothing
but the tenant check stands in the way."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from snapsell.outbox.v1 import outbox_pb2
from snapsell.seller_admin.v1 import seller_admin_pb2

from tests.integration.outbox.stack import (
    SMS_SENDER,
    TENANT,
    OutboxStack,
    new_phone,
    sms,
    whatsapp,
)
from tests.support.polling import eventually
from tools.dev_keys import DevKeys
from tools.stack import RunningService

VICTIM = "shop-victim"
VICTIM_ACCOUNT = "AC" + "7" * 32
VICTIM_WHATSAPP = "whatsapp:+14155238887"
VICTIM_SMS = "+14155550177"
VICTIM_SERVICE = "MG" + "7" * 32
VICTIM_ALPHANUMERIC = "ShopB"
TENANT_ALPHANUMERIC = "ShopA"
TENANT_ALPHANUMERIC_NUMBER = "+14155550166"
_keys = itertools.count()


@pytest.fixture(scope="module")
async def stack(admin_dsn: str, nats_url: str, token_keys: DevKeys) -> AsyncIterator[OutboxStack]:
    running = OutboxStack(admin_dsn, nats_url, token_keys)
    try:
        await running.start()
        await running.add_channels(
            VICTIM, VICTIM_WHATSAPP, VICTIM_SERVICE, account_sid=VICTIM_ACCOUNT
        )
        admin = running.metadata("admin")
        for tenant, number, name, account in (
            (VICTIM, VICTIM_SMS, VICTIM_ALPHANUMERIC, VICTIM_ACCOUNT),
            (TENANT, TENANT_ALPHANUMERIC_NUMBER, TENANT_ALPHANUMERIC, "AC" + "5" * 32),
        ):
            await running.seller_admin_stub().AddChannel(
                seller_admin_pb2.AddChannelRequest(
                    tenant_id=tenant,
                    address=number,
                    account_sid=account,
                    alphanumeric_sender_id=name,
                ),
                metadata=admin,
            )
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def outbox(stack: OutboxStack) -> RunningService:
    # The victim's account is one the outbox sends with: only the tenant check can refuse.
    return await stack.start_outbox(TWILIO_AUTH_TOKENS=f"{VICTIM_ACCOUNT}=victim-token")


async def enqueue_as(
    stack: OutboxStack, outbox: RunningService, metadata: Any, **fields: Any
) -> tuple[grpc.StatusCode, str, str]:
    """(code, details, idempotency key) of an Enqueue for TENANT."""
    key = f"send-path-{next(_keys)}"
    request = outbox_pb2.EnqueueRequest(
        tenant_id=TENANT, idempotency_key=key, body=fields.pop("body", "hello"), **fields
    )
    try:
        await stack.outbox(outbox).Enqueue(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", key
    return grpc.StatusCode.OK, "", key


async def stored(stack: OutboxStack, key: str) -> int:
    return await stack.count("SELECT count(*) FROM outbox.messages WHERE idempotency_key = $1", key)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"sender": VICTIM_WHATSAPP, "recipient": whatsapp("+33612345678")}, id="wa"),
        pytest.param({"sender": VICTIM_SMS, "recipient": sms("+33612345678")}, id="sms"),
        pytest.param(
            {"sender": VICTIM_SERVICE, "recipient": sms("+33612345678")}, id="messaging-service"
        ),
        pytest.param(
            {
                "sender": SMS_SENDER,
                "recipient": sms("+33612345678"),
                "account_sid": VICTIM_ACCOUNT,
            },
            id="account",
        ),
    ],
)
async def test_a_tenant_cannot_send_from_another_tenants_channel_or_account(
    stack: OutboxStack, outbox: RunningService, fields: dict[str, Any]
) -> None:
    owner = stack.metadata("owner", TENANT)
    code, details, key = await enqueue_as(stack, outbox, owner, **fields)
    assert code is grpc.StatusCode.FAILED_PRECONDITION, details
    assert f"of tenant {TENANT}" in details and "\n" not in details
    assert await stored(stack, key) == 0
    # The same sender is refused to routing acting for TENANT too.
    code, _, key = await enqueue_as(stack, outbox, stack.metadata(sub="routing"), **fields)
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert await stored(stack, key) == 0


async def test_a_tenant_sends_from_its_own_channels_with_their_account(
    stack: OutboxStack, outbox: RunningService
) -> None:
    owner = stack.metadata("owner", TENANT)
    code, details, key = await enqueue_as(
        stack, outbox, owner, sender=SMS_SENDER, recipient=sms(new_phone())
    )
    assert code is grpc.StatusCode.OK, details
    assert stack.db is not None
    account = await stack.db.fetchval(
        "SELECT account_sid FROM outbox.messages WHERE idempotency_key = $1", key
    )
    assert account == "AC" + "5" * 32


@pytest.mark.parametrize(
    ("sender", "allowed"),
    [
        (VICTIM_ALPHANUMERIC, False),
        ("ShopC", False),
        (TENANT_ALPHANUMERIC.upper(), False),
        (TENANT_ALPHANUMERIC, True),
    ],
)
async def test_only_an_alphanumeric_sender_the_tenant_declared_is_accepted(
    stack: OutboxStack, outbox: RunningService, sender: str, allowed: bool
) -> None:
    code, details, key = await enqueue_as(
        stack, outbox, stack.metadata("owner", TENANT), sender=sender, recipient=sms(new_phone())
    )
    expected = grpc.StatusCode.OK if allowed else grpc.StatusCode.FAILED_PRECONDITION
    assert code is expected, details
    assert await stored(stack, key) == int(allowed)


@pytest.mark.parametrize(
    ("role", "sub"),
    [
        ("owner", None),
        ("manager", None),
        ("admin", None),
        ("service", "live_catalog"),
        ("service", "routing"),
    ],
)
async def test_only_routing_may_enqueue_compliance_messages(
    stack: OutboxStack, outbox: RunningService, role: str, sub: str | None
) -> None:
    tenant = TENANT if role in ("owner", "manager") else None
    code, details, key = await enqueue_as(
        stack,
        outbox,
        stack.metadata(role, tenant, sub=sub),
        sender=SMS_SENDER,
        recipient=sms(new_phone()),
        body="You are unsubscribed. Reply START to resubscribe.",
        kind=outbox_pb2.MESSAGE_KIND_COMPLIANCE,
    )
    allowed = sub == "routing"
    expected = grpc.StatusCode.OK if allowed else grpc.StatusCode.PERMISSION_DENIED
    assert code is expected, details
    assert await stored(stack, key) == int(allowed)


async def test_a_channel_removed_in_seller_admin_is_refused_soon_after(
    stack: OutboxStack, outbox: RunningService
) -> None:
    sender = "+14155550188"
    await stack.add_channels(TENANT, sender)
    owner = stack.metadata("owner", TENANT)
    code, details, _ = await enqueue_as(
        stack, outbox, owner, sender=sender, recipient=sms(new_phone())
    )
    assert code is grpc.StatusCode.OK, details  # now cached by the outbox
    await stack.seller_admin_stub().RemoveChannel(
        seller_admin_pb2.RemoveChannelRequest(tenant_id=TENANT, address=sender),
        metadata=stack.metadata("admin"),
    )

    async def refused() -> bool:
        code, _, _ = await enqueue_as(
            stack, outbox, owner, sender=sender, recipient=sms(new_phone())
        )
        return code is grpc.StatusCode.FAILED_PRECONDITION

    # Far sooner than the cache's 30 s TTL: seller_admin's channel.removed event drops it.
    await eventually(refused, timeout_s=5, every_s=0.2)
