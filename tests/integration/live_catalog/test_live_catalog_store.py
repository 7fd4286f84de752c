"""The catalog's rules against the real PostgreSQL: posting by message, claims, the waitlist,
cancels and promotions, stock changes, exactly-once per MessageSid, and the summaries."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest

from services.live_catalog.domain import Inbound, PreconditionError
from services.live_catalog.store import CatalogStore
from tests.integration.live_catalog.conftest import HOLD, ManualClock, inbound

pytestmark = pytest.mark.usefixtures("clean_tables")


async def replies_to(pool: asyncpg.Pool, value: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT body FROM replies WHERE recipient_value = $1 ORDER BY created_at, id", value
    )
    return [row["body"] for row in rows]


async def post(store: CatalogStore, tenant: str, session: uuid.UUID, body: str) -> str:
    return await store.handle_inbound(inbound(body, tenant=tenant, session=session, seller=True))


async def test_seller_posts_three_clients_claim_one_cancels_and_the_waitlist_is_served(
    store, pool, tenant, session_id
) -> None:
    assert await post(store, tenant, session_id, "A12 Robe 25€ x2") == "seller_posted"
    assert await replies_to(pool, "+33600000001") == ["A12 publié : Robe 25 €, stock 2."]

    outcomes = [
        await store.handle_inbound(inbound("A12", tenant=tenant, session=session_id, sender=who))
        for who in ("+331", "+332", "+333")
    ]
    assert outcomes == ["held", "held", "waiting"]
    assert await replies_to(pool, "+333") == [
        "A12 est épuisé pour le moment : vous êtes n°1 sur la liste d'attente."
    ]

    # A conversation message (no session id) still finds the current session.
    cancel = inbound("ANNULER A12", tenant=tenant, session=None, sender="+331")
    assert await store.handle_inbound(cancel) == "cancelled"
    assert await replies_to(pool, "+333") == [
        "A12 est épuisé pour le moment : vous êtes n°1 sur la liste d'attente.",
        "A12 est à vous ! Il vous est réservé pendant 30 min.",
    ]
    item = (await store.list_items(tenant, session_id))[0]
    assert (item.stock, item.held, item.waiting) == (2, 2, 0)


async def test_a_straggler_received_earlier_queues_ahead_of_later_waiters_not_of_the_holder(
    store, pool, clock: ManualClock, tenant, session_id
) -> None:
    """Decided in another transaction (another batch or replica) after later claims: the unit
    already given stays given, but the straggler takes its received_at place in the line."""
    await post(store, tenant, session_id, "A12 Robe 25€ x1")

    def claim(who: str, at_s: int, body: str = "A12") -> Inbound:
        at = clock.now + timedelta(seconds=at_s)
        return inbound(body, tenant=tenant, session=session_id, sender=who, at=at)

    assert await store.handle_inbound(claim("+3310", 10)) == "held"
    assert await store.handle_inbound(claim("+3320", 20)) == "waiting"
    assert await store.handle_inbound(claim("+3305", 5)) == "waiting"
    assert await replies_to(pool, "+3305") == [
        "A12 est épuisé pour le moment : vous êtes n°1 sur la liste d'attente."
    ]
    assert await store.handle_inbound(claim("+3330", 30)) == "waiting"
    assert (await replies_to(pool, "+3330"))[0].endswith("n°3 sur la liste d'attente.")

    assert await store.handle_inbound(claim("+3310", 40, "ANNULER A12")) == "cancelled"
    assert (await replies_to(pool, "+3305"))[-1].startswith("A12 est à vous")
    assert len(await replies_to(pool, "+3320")) == 1  # still waiting, now n°1


async def test_the_same_message_sid_three_times_makes_one_reservation_and_one_reply(
    store, pool, tenant, session_id
) -> None:
    await post(store, tenant, session_id, "A12 Robe 25€ x1")
    claim = inbound("A12", tenant=tenant, session=session_id, sender="+334", sid="SMsame")
    assert [await store.handle_inbound(claim) for _ in range(3)] == [
        "held",
        "duplicate",
        "duplicate",
    ]
    assert await pool.fetchval("SELECT count(*) FROM reservations") == 1
    assert len(await replies_to(pool, "+334")) == 1


@pytest.mark.parametrize(
    ("body", "reply"),
    [
        ("Z9", "Code Z9 inconnu. Vérifiez le code annoncé pendant le live."),
        ("A12 x3", "A12 : 2 unité(s) au maximum par personne."),
        ("ANNULER A12", "Vous n'avez pas de réservation pour A12."),
    ],
)
async def test_client_mistakes_get_a_clear_reply(store, pool, tenant, session_id, body, reply):
    await post(store, tenant, session_id, "A12 Robe 25€ x5")
    await store.handle_inbound(inbound(body, tenant=tenant, session=session_id, sender="+335"))
    assert await replies_to(pool, "+335") == [reply]


async def test_an_item_posted_with_a_price_only_is_answered_with_its_code(
    store, pool, tenant, session_id
) -> None:
    await post(store, tenant, session_id, "C7 19,90€ x2")
    assert (await replies_to(pool, "+33600000001"))[-1] == "C7 publié : 19,90 €, stock 2."
    await store.handle_inbound(inbound("C7", tenant=tenant, session=session_id, sender="+3"))
    assert await replies_to(pool, "+3") == ["C7 est réservé pour vous (1 x C7) pendant 30 min."]


async def test_a_second_claim_by_the_same_client_is_told_it_already_has_one(
    store, pool, tenant, session_id
) -> None:
    await post(store, tenant, session_id, "A12 Robe 25€ x5")
    for _ in range(2):
        await store.handle_inbound(inbound("A12", tenant=tenant, session=session_id, sender="+3"))
    assert (await replies_to(pool, "+3"))[1] == "Vous avez déjà une réservation pour A12."
    assert await pool.fetchval("SELECT held FROM items") == 1


async def test_lowering_stock_below_what_is_held_is_refused_with_the_reason(
    store, pool, tenant, session_id
) -> None:
    await post(store, tenant, session_id, "A12 Robe 25€ x3")
    for who in ("+31", "+32"):
        await store.handle_inbound(inbound("A12", tenant=tenant, session=session_id, sender=who))
    assert await post(store, tenant, session_id, "A12 stock 1") == "seller_stock_refused"
    assert (await replies_to(pool, "+33600000001"))[-1] == (
        "Stock de A12 inchangé : 2 unité(s) déjà réservée(s) ou vendue(s), "
        "impossible de descendre à 1."
    )
    assert await pool.fetchval("SELECT stock FROM items") == 3
    item_id = await pool.fetchval("SELECT id FROM items")
    with pytest.raises(PreconditionError, match="below the 2 unit"):
        await store.update_item(
            tenant,
            item_id,
            title=None,
            price_cents=None,
            stock=1,
            max_per_client=None,
            correlation="",
        )


async def test_raising_stock_serves_the_waitlist(store, pool, tenant, session_id) -> None:
    await post(store, tenant, session_id, "A12 Robe 25€ x1")
    for who in ("+31", "+32", "+33"):
        await store.handle_inbound(inbound("A12", tenant=tenant, session=session_id, sender=who))
    assert await post(store, tenant, session_id, "A12 stock 2") == "seller_stock"
    assert (await replies_to(pool, "+32"))[-1].startswith("A12 est à vous")
    assert len(await replies_to(pool, "+33")) == 1


async def test_the_database_refuses_an_oversell_whatever_the_code_does(
    store, pool, tenant, session_id
) -> None:
    await post(store, tenant, session_id, "A12 Robe 25€ x1")
    with pytest.raises(asyncpg.CheckViolationError, match="items_units_within_stock"):
        await pool.execute("UPDATE items SET held = 2")


async def test_same_code_in_two_tenants_or_two_sessions_is_independent(
    store, pool, tenant, session_id
) -> None:
    other_session, other_tenant = uuid.uuid4(), tenant + "-b"
    await post(store, tenant, session_id, "A12 Robe 25€ x1")
    await post(store, other_tenant, other_session, "A12 Sac 40€ x1")
    for t, s in ((tenant, session_id), (other_tenant, other_session)):
        assert await store.handle_inbound(inbound("A12", tenant=t, session=s)) == "held"


async def test_hold_expiry_releases_the_unit_to_the_head_of_the_waitlist(
    store, pool, clock: ManualClock, tenant, session_id
) -> None:
    await post(store, tenant, session_id, "A12 Robe 25€ x1")
    for who in ("+31", "+32"):
        await store.handle_inbound(inbound("A12", tenant=tenant, session=session_id, sender=who))
    assert await store.expire_holds() == (0, 0)
    clock.advance(HOLD + timedelta(seconds=1))
    assert await store.expire_holds() == (1, 1)
    assert (await replies_to(pool, "+31"))[-1] == "Votre réservation de A12 a expiré."
    assert (await replies_to(pool, "+32"))[-1].startswith("A12 est à vous")


async def test_after_the_live_a_code_gets_this_live_is_over_and_each_buyer_one_summary(
    store, pool, clock: ManualClock, tenant, session_id
) -> None:
    await post(store, tenant, session_id, "A12 Robe 25€ x1")
    await post(store, tenant, session_id, "B3 Sac 40€ x2")
    for who, code in (("+31", "A12"), ("+31", "B3"), ("+32", "A12"), ("+33", "B3")):
        await store.handle_inbound(inbound(code, tenant=tenant, session=session_id, sender=who))
    for _ in range(2):  # a redelivered session.closed summarizes once
        await store.summarize_session(
            tenant,
            session_id,
            started_at=clock.now,
            closed_at=clock.now,
            content_sid="",
            correlation="",
        )
    assert (await replies_to(pool, "+31"))[-1] == (
        "Récapitulatif du live : A12 Robe (25 €) x1 réservé ; B3 Sac (40 €) x1 réservé. Merci !"
    )
    assert len(await replies_to(pool, "+32")) == 1  # waitlisted only: no summary
    seller = await replies_to(pool, "+33600000001")
    assert seller[-1].startswith("Récapitulatif du live : 2 article(s), 3 réservé(s)")
    assert await pool.fetchval("SELECT count(*) FROM reservations WHERE status = 'waiting'") == 0

    late = inbound("A12", tenant=tenant, session=None, sender="+34")
    assert await store.handle_inbound(late) == "session_ended"
    assert await replies_to(pool, "+34") == ["Ce live est terminé : A12 n'est plus disponible."]


async def test_a_buyer_outside_the_whatsapp_window_gets_the_template(
    store, pool, clock: ManualClock, tenant, session_id
) -> None:
    await post(store, tenant, session_id, "A12 Robe 25€ x1")
    await store.handle_inbound(inbound("A12", tenant=tenant, session=session_id, sender="+31"))
    clock.advance(timedelta(hours=25))
    summarized = await store.summarize_session(
        tenant,
        session_id,
        started_at=clock.now,
        closed_at=clock.now,
        content_sid="HX" + "a" * 32,
        correlation="",
    )
    assert summarized is not None and summarized.buyer_summaries == 1
    assert (
        await pool.fetchval(
            "SELECT content_sid FROM replies WHERE recipient_value = '+31' AND body LIKE 'Récap%'"
        )
        == "HX" + "a" * 32
    )


async def test_a_live_without_items_sends_the_seller_no_summary(
    store, pool, clock: ManualClock, tenant, session_id
) -> None:
    await post(store, tenant, session_id, "Bonjour à tous !")
    summarized = await store.summarize_session(
        tenant,
        session_id,
        started_at=clock.now,
        closed_at=clock.now,
        content_sid="",
        correlation="",
    )
    assert summarized is not None and not summarized.seller_summary
    assert await replies_to(pool, "+33600000001") == []


async def test_a_closed_item_reopens_when_the_seller_posts_it_again_not_on_an_rpc_edit(
    store, pool, tenant, session_id
) -> None:
    await post(store, tenant, session_id, "A12 Robe 25€ x1")
    assert await post(store, tenant, session_id, "A12 fin") == "seller_closed"
    item_id = await pool.fetchval("SELECT id FROM items")
    edited, _ = await store.update_item(
        tenant, item_id, title=None, price_cents=None, stock=3, max_per_client=None, correlation=""
    )
    assert (edited.status.value, edited.stock) == ("closed", 3)
    assert await store.handle_inbound(inbound("A12", tenant=tenant, session=session_id)) == (
        "item_closed"
    )
    assert await post(store, tenant, session_id, "A12 Robe 25€ x2") == "seller_updated"
    assert await store.handle_inbound(inbound("A12", tenant=tenant, session=session_id)) == "held"
