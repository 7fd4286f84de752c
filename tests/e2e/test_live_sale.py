"""A live sale through the real front door: the seller posts an item by WhatsApp, clients claim
it by its code, and every answer reaches them through the outbox and the Twilio sandbox. No RPC
links routing to the catalog: the catalog consumes routing's MessageRouted events."""

from __future__ import annotations

import asyncio

from tests.e2e.conftest import LIVE_WINDOW_S
from tests.e2e.harness import Harness, Shop, eventually, new_mobile, shop_from_api
from tests.support.stack import SystemStack

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
