"""The live catalog's message grammar and reply texts, table-driven."""

from __future__ import annotations

import re

import pytest

from services.live_catalog.domain import (
    BuyerLine,
    Cancel,
    Claim,
    CloseItem,
    Grammar,
    ItemTotals,
    PostItem,
    Replies,
    ReservationStatus,
    SellerHelp,
    SetStock,
    buyer_summary_lines,
    format_price,
    parse_price,
    seller_summary_lines,
)

GRAMMAR = Grammar()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("A12 Robe rouge T38 25€ x3", PostItem("A12", "Robe rouge T38", 2500, 3, None)),
        ("a12 Robe rouge 25,50 € X2", PostItem("A12", "Robe rouge", 2550, 2, None)),
        ("B3 Sac €40 x1 max2", PostItem("B3", "Sac", 4000, 1, 2)),
        ("B3 Sac 40 eur x5 max 3", PostItem("B3", "Sac", 4000, 5, 3)),
        ("C7 Collier doré", PostItem("C7", "Collier doré", None, 1, None)),
        ("C7 19.9€", PostItem("C7", "", 1990, 1, None)),
        ("A12 stock 5", SetStock("A12", 5)),
        ("A12 STOCK 0", SetStock("A12", 0)),
        ("A12 fin", CloseItem("A12")),
        ("A12 Fini", CloseItem("A12")),
        ("A12 end", CloseItem("A12")),
        ("A12 close", CloseItem("A12")),
        ("A12", SellerHelp("A12")),
        ("A12 x3", SellerHelp("A12")),
        ("A12 stock beaucoup", SellerHelp("A12")),
        ("A12 stock 99999", SellerHelp("A12")),
        ("A12 Robe 25€ x0", SellerHelp("A12")),
        ("A12 fin maintenant", SellerHelp("A12")),
        ("Bonjour à tous, on commence !", None),
        ("", None),
        ("La robe A12 est magnifique", None),
    ],
)
def test_seller_messages(body: str, expected: object) -> None:
    assert GRAMMAR.parse_seller(body) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("A12", Claim("A12", 1)),
        (" a12 ", Claim("A12", 1)),
        ("A12!", Claim("A12", 1)),
        ("A12 x2", Claim("A12", 2)),
        ("A12 X3", Claim("A12", 3)),
        ("A12 \u00d72", Claim("A12", 2)),
        ("ANNULER A12", Cancel("A12")),
        ("annulé a12", Cancel("A12")),
        ("Cancel A12", Cancel("A12")),
        ("A12 stp", None),
        ("je veux A12", None),
        ("merci", None),
        ("ANNULER", None),
        ("ANNULER tout", None),
        ("ABCD12", None),
    ],
)
def test_client_messages(body: str, expected: object) -> None:
    assert GRAMMAR.parse_client(body) == expected


def test_a_tenant_adds_keywords_and_its_own_code_pattern() -> None:
    grammar = GRAMMAR.extended(cancel=["retirer"], close=["vendu"], item_code=r"\d{1,3}")
    assert grammar.parse_client("RETIRER 42") == Cancel("42")
    assert grammar.parse_seller("42 vendu") == CloseItem("42")
    assert grammar.parse_client("A12") is None


@pytest.mark.parametrize(
    ("amount", "cents"), [("25", 2500), ("25,5", 2550), ("25.50", 2550), ("0,99", 99)]
)
def test_parse_price(amount: str, cents: int) -> None:
    assert parse_price(amount) == cents


@pytest.mark.parametrize(
    ("cents", "currency", "text"),
    [(2500, "EUR", "25 €"), (2550, "EUR", "25,50 €"), (1905, "USD", "19,05 USD")],
)
def test_format_price(cents: int, currency: str, text: str) -> None:
    assert format_price(cents, currency) == text


@pytest.mark.parametrize(
    ("name", "values", "text"),
    [
        (
            "held",
            {"code": "A12", "quantity": 1, "title": "Robe", "hold_minutes": 30},
            "A12 est réservé pour vous (1 x Robe) pendant 30 min.",
        ),
        (
            "waiting",
            {"code": "A12", "position": 1},
            "A12 est épuisé pour le moment : vous êtes n°1 sur la liste d'attente.",
        ),
        ("sold_out", {"code": "A12"}, "A12 est épuisé."),
        (
            "unknown_code",
            {"code": "Z9"},
            "Code Z9 inconnu. Vérifiez le code annoncé pendant le live.",
        ),
        ("cancelled", {"code": "A12"}, "Votre réservation de A12 est annulée."),
        (
            "promoted",
            {"code": "A12", "hold_minutes": 30},
            "A12 est à vous ! Il vous est réservé pendant 30 min.",
        ),
    ],
)
def test_french_default_replies(name: str, values: dict[str, object], text: str) -> None:
    assert Replies().render(name, **values) == text


def test_a_tenant_overrides_a_reply_with_the_same_placeholders() -> None:
    replies = Replies().overridden({"sold_out": "Plus de {code}, désolé"})
    assert replies.render("sold_out", code="A12") == "Plus de A12, désolé"


@pytest.mark.parametrize(
    ("texts", "error"),
    [
        ({"nope": "x"}, "unknown reply 'nope'"),
        ({"sold_out": "{code} {price}"}, "unknown placeholder(s) ['price']"),
    ],
)
def test_overrides_with_unknown_names_are_refused(texts: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        Replies().overridden(texts)


def test_buyer_summary_lists_each_reservation_in_code_order() -> None:
    lines = [
        BuyerLine("B3", "Sac", 1, ReservationStatus.WAITING, None, "EUR"),
        BuyerLine("A12", "Robe", 2, ReservationStatus.HELD, 2500, "EUR"),
    ]
    assert buyer_summary_lines(lines) == "A12 Robe (25 €) x2 réservé ; B3 Sac x1 liste d'attente"


def test_seller_summary_totals_then_items() -> None:
    items = [ItemTotals("A12", "Robe", 3, 1, 1, 2, 4), ItemTotals("B3", "Sac", 1, 0, 1, 0, 0)]
    assert seller_summary_lines(items) == (
        "2 article(s), 1 réservé(s), 2 confirmé(s), 2 libéré(s), 4 en attente ; "
        "A12 2/3 pris (1 confirmé(s)), 4 en attente ; B3 1/1 pris (1 confirmé(s)), 0 en attente"
    )
