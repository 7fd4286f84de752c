"""A live sale through the real front door: the seller posts an item by WhatsApp, clients claim
it by its code, and every answer reaches them through the outbox and the Twilio sandbox. No RPC
links routing to the catalog: the catalog consumes routing's MessageRouted events."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from tests.e2e.conftest import LIVE_WINDOW_S, SUMMARY_CONTENT_SID, TEMPLATE_TENANT
from tests.e2e.harness import Harness, Shop, new_mobile, shop_from_api
from tests.support.polling import eventually
from tools.stack import SystemStack

BUYER_SUMMARY = "Récapitulatif du live : A12 Robe (25 €) x1 réservé. Merci !"
SETTLE_S = 3.0


async def replies_to(
    harness: Harness, phone: str, count: int, timeout_s: float = 20.0
) -> list[str]:
    """The bodies the sandbox accepted for `phone`, once there are `count` of them."""

    async def enough() -> list[str] | None:
        bodies = [str(m["body"]) for m in await harness.sandbox_sent(f"whatsapp:{phone}")]
        return bodies if len(bodies) >= count else None

    return list(await eventually(enough, timeout_s=timeout_s))


async def test_two_claims_hold_the_stock_the_third_waits_and_is_promoted_on_a_cancel(
    harness: Harness, system: SystemStack
) -> None:
    shop: Shop = await shop_from_api(system, "live-sale")
    first, second, third = new_mobile(), new_mobile(), new_mobile()

    await harness.send(shop, shop.seller, "A12 Robe 25€ x2")
    [posted] = await replies_to(harness, shop.seller, 1)
    assert posted.startswith("A12 publié") and "stock 2" in posted

    for client in (first, second, third):
        await harness.send(shop, client, "A12")
        # One at a time: the gateway's received_at orders the claims.
        await replies_to(harness, client, 1)
    [held_first] = await replies_to(harness, first, 1)
    [held_second] = await replies_to(harness, second, 1)
    [waiting] = await replies_to(harness, third, 1)
    assert held_first.startswith("A12 est réservé pour vous")
    assert held_second.startswith("A12 est réservé pour vous")
    assert "n°1 sur la liste d'attente" in waiting

    await harness.send(shop, first, "ANNULER A12")
    cancelled = (await replies_to(harness, first, 2))[1]
    assert cancelled == "Votre réservation de A12 est annulée."
    promoted = (await replies_to(harness, third, 2))[1]
    assert promoted.startswith("A12 est à vous")
    assert len(await harness.sandbox_sent(f"whatsapp:{second}")) == 1

    # Nobody writes any more: the idle window closes the live, and each buyer and the seller
    # get one summary; the client who cancelled holds nothing and gets none.
    seller_summary = (await replies_to(harness, shop.seller, 2, LIVE_WINDOW_S + 30))[1]
    assert seller_summary.startswith("Récapitulatif du live : 1 article(s), 2 réservé(s)")
    assert "A12 2/2 pris" in seller_summary
    summaries = [
        (await replies_to(harness, buyer, 3 if buyer == third else 2))[-1]
        for buyer in (second, third)
    ]
    assert summaries == [BUYER_SUMMARY, BUYER_SUMMARY]
    await asyncio.sleep(SETTLE_S)  # a second summary would have arrived by now
    for phone, count in {shop.seller: 2, first: 2, second: 2, third: 3}.items():
        assert len(await harness.sandbox_sent(f"whatsapp:{phone}")) == count, phone


async def test_a_code_before_or_after_a_live_is_answered_and_opens_no_live(
    harness: Harness, system: SystemStack
) -> None:
    shop: Shop = await shop_from_api(system, "no-live-yet")
    early, late = new_mobile(), new_mobile()

    await harness.send(shop, early, "A12")
    [unknown] = await replies_to(harness, early, 1)
    assert unknown.startswith("Code A12 inconnu")
    assert await harness.sessions(shop) == []  # only a seller's message starts a live

    await harness.send(shop, shop.seller, "A12 Robe 25€ x1")
    await replies_to(harness, shop.seller, 1)
    live = await harness.current_session(shop)
    assert live is not None
    await harness.close_session(shop, live.session_id)

    await harness.send(shop, late, "A12")
    [ended] = await replies_to(harness, late, 1)
    assert ended.startswith("Ce live est terminé")
    assert await harness.current_session(shop) is None
    assert [s.session_id for s in await harness.sessions(shop)] == [live.session_id]


# The buyer's last message, as the catalog and routing (the outbox's source for WhatsApp's
# 24-hour window) recorded it, moved back a day: what a buyer who claimed early in a long live
# looks like when it ends.
AGE_BUYER = (
    "UPDATE live_catalog.reservations SET received_at = received_at - interval '25 hours'"
    " WHERE tenant_id = $1 AND client_value = $2",
    "UPDATE routing.last_inbound SET last_inbound_at = last_inbound_at - interval '25 hours'"
    " WHERE tenant_id = $1 AND address LIKE '%' || $2",
)


async def test_a_buyer_outside_the_whatsapp_window_gets_the_summary_as_the_tenants_template(
    harness: Harness, system: SystemStack
) -> None:
    shop: Shop = await shop_from_api(system, "template", tenant=TEMPLATE_TENANT)
    buyer = new_mobile()
    await harness.send(shop, shop.seller, "A12 Robe 25€ x1")
    await replies_to(harness, shop.seller, 1)
    await harness.send(shop, buyer, "A12")
    [held] = await replies_to(harness, buyer, 1)
    assert held.startswith("A12 est réservé pour vous")
    live = await harness.current_session(shop)
    assert live is not None

    db = await asyncpg.connect(system.admin_dsn)
    try:
        for statement in AGE_BUYER:
            assert await db.execute(statement, shop.tenant_id, buyer) == "UPDATE 1"
        await harness.close_session(shop, live.session_id)

        async def summary() -> dict[str, object] | None:
            sent = await harness.sandbox_sent(f"whatsapp:{buyer}")
            return sent[1] if len(sent) > 1 else None

        sent = await eventually(summary, timeout_s=30)
        assert sent["content_sid"] == SUMMARY_CONTENT_SID
        assert json.loads(str(sent["content_variables"])) == {"1": BUYER_SUMMARY}
        # The seller wrote within the window: a plain text.
        seller_summary = (await replies_to(harness, shop.seller, 2))[1]
        assert seller_summary.startswith("Récapitulatif du live : 1 article(s), 1 réservé(s)")
        await asyncio.sleep(SETTLE_S)
        statuses = await db.fetch(
            "SELECT status FROM outbox.messages WHERE tenant_id = $1 AND recipient LIKE '%' || $2",
            shop.tenant_id,
            buyer,
        )
        assert len(statuses) == 2  # the reply to the claim and the summary, neither dead
        assert {row["status"] for row in statuses} <= {"sent", "delivered", "read"}
        assert len(await harness.sandbox_sent(f"whatsapp:{buyer}")) == 2
    finally:
        await db.close()
