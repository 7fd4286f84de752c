"""Consent belongs to the person: a shop (owner, manager) or an operator (admin) cannot opt back in
someone whose own STOP or whose carrier's opt-out is recorded; only their START does. An operator
may lift an opt-out an operator set, and that is audited. Staff do not see who opted out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import httpx
import pytest
from snapsell.routing.v1 import events_pb2 as routing_events
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc

from tests.e2e.harness import Harness, Shop, new_mobile, shop_from_api, whatsapp
from tests.support.polling import eventually

OPTED_IN = routing_pb2.CONSENT_STATE_OPTED_IN
OPTED_OUT = routing_pb2.CONSENT_STATE_OPTED_OUT
MakeToken = Callable[..., str]
Metadata = tuple[tuple[str, str]]
Stub = routing_pb2_grpc.RoutingServiceStub


@pytest.fixture(scope="module")
async def shop(harness: Harness) -> Shop:
    return await shop_from_api(harness.stack, "consent-shop")


@pytest.fixture(scope="module")
async def stub(harness: Harness) -> AsyncIterator[routing_pb2_grpc.RoutingServiceStub]:
    async with grpc.aio.insecure_channel(harness.stack.address("routing")) as channel:
        yield routing_pb2_grpc.RoutingServiceStub(channel)


def bearer(make_token: MakeToken, role: str, shop: Shop, sub: str) -> Metadata:
    tenant = shop.tenant_id if role in ("owner", "manager", "staff") else None
    return (("authorization", f"Bearer {make_token(role, tenant, sub)}"),)


async def set_consent(
    stub: Stub, shop: Shop, metadata: Metadata, client: str, state: int
) -> routing_pb2.SetConsentResponse:
    return await stub.SetConsent(
        routing_pb2.SetConsentRequest(
            tenant_id=shop.tenant_id, address=whatsapp(client), state=state, reason="asked"
        ),
        metadata=metadata,
        timeout=10,
    )


async def opted_out_by(stub: Stub, shop: Shop, client: str, source: int) -> None:
    async def recorded() -> bool:
        reply = await stub.ListOptOuts(
            routing_pb2.ListOptOutsRequest(tenant_id=shop.tenant_id, page_size=500),
            metadata=shop.metadata,
            timeout=10,
        )
        return any(o.address.value == client and o.source == source for o in reply.opt_outs)

    await eventually(recorded, timeout_s=20)


async def assert_opt_in_refused(
    harness: Harness, stub: Stub, shop: Shop, metadata: Metadata, client: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await set_consent(stub, shop, metadata, client, OPTED_IN)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details() or ""
    assert "START" in details and "\n" not in details
    assert client in await harness.opted_out(shop)


@pytest.mark.parametrize("role", ["owner", "manager", "admin"])
async def test_opt_in_by_the_shop_or_an_operator_cannot_lift_a_keyword_stop(
    harness: Harness, stub: Stub, shop: Shop, make_token: MakeToken, role: str
) -> None:
    client = new_mobile()
    await harness.send(shop, client, "STOP")
    await opted_out_by(stub, shop, client, routing_pb2.CONSENT_SOURCE_KEYWORD)

    await assert_opt_in_refused(harness, stub, shop, bearer(make_token, role, shop, "eve"), client)

    # The person's own START still opts them back in.
    await harness.send(shop, client, "START")

    async def lifted() -> bool:
        return client not in await harness.opted_out(shop)

    await eventually(lifted, timeout_s=20)


@pytest.mark.parametrize("role", ["owner", "manager"])
async def test_opt_in_by_the_shop_cannot_lift_a_carrier_opt_out(
    harness: Harness, stub: Stub, shop: Shop, make_token: MakeToken, role: str
) -> None:
    client = new_mobile()
    async with httpx.AsyncClient(timeout=10) as http:
        faults = {"error_code_for": {client: 21610}}  # Twilio: the recipient unsubscribed
        (
            await http.post(f"{harness.stack.sandbox_url}/_sandbox/faults", json=faults)
        ).raise_for_status()
    sid = await harness.send(shop, client, "bonjour")  # opens WhatsApp's 24-hour window
    # Once routing has it: the outbox reads the window from routing before it sends.
    await harness.wait_event(
        "ROUTING_EVENTS",
        "routing.v1.message.routed",
        routing_events.MessageRouted,
        lambda event: event.message.message_sid == sid,
    )
    await harness.enqueue(shop, client, "Votre robe est prête")
    await opted_out_by(stub, shop, client, routing_pb2.CONSENT_SOURCE_CARRIER)

    await assert_opt_in_refused(harness, stub, shop, bearer(make_token, role, shop, "eve"), client)


async def test_an_operator_may_lift_an_operator_opt_out_and_it_is_audited(
    harness: Harness, stub: Stub, shop: Shop, make_token: MakeToken
) -> None:
    client = new_mobile()
    operator = bearer(make_token, "admin", shop, "ops-alice")
    assert (await set_consent(stub, shop, operator, client, OPTED_OUT)).opted_out

    reply = await set_consent(stub, shop, operator, client, OPTED_IN)

    assert reply.changed and not reply.opted_out
    removed = await harness.wait_event(
        "ROUTING_EVENTS",
        "routing.v1.opt_out.removed",
        routing_events.OptOutChanged,
        lambda event: event.tenant_id == shop.tenant_id and event.address.value == client,
    )
    assert [(e.actor, e.source, e.reason) for e in removed] == [
        ("ops-alice", routing_pb2.CONSENT_SOURCE_OPERATOR, "asked")
    ]


async def test_staff_may_not_list_opt_outs(
    harness: Harness, stub: Stub, shop: Shop, make_token: MakeToken
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListOptOuts(
            routing_pb2.ListOptOutsRequest(tenant_id=shop.tenant_id),
            metadata=bearer(make_token, "staff", shop, "bob"),
            timeout=10,
        )
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
