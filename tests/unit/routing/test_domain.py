"""Routing's pure rules: consent keywords, live signals and the decision for one message."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.routing.domain import (
    DEFAULT_HELP_REPLY,
    DEFAULT_OPT_IN_REPLY,
    DEFAULT_OPT_OUT_REPLY,
    HELP_KEYWORDS,
    OPT_IN_KEYWORDS,
    OPT_OUT_KEYWORDS,
    Channel,
    ConsentChange,
    ConsentIntent,
    ConsentKeywords,
    ConsentLockedError,
    ConsentOutcome,
    ConsentReplies,
    ConsentScope,
    ConsentSource,
    ConsentState,
    Contact,
    Decision,
    DecisionKind,
    InboundFacts,
    InvalidAddressError,
    KeywordConflictError,
    LiveSignalKind,
    RulesBook,
    SenderRole,
    TenantRules,
    check_opt_in_may_lift,
    consent_reply,
    decide,
    normalise_address,
    normalise_keyword,
)

RULES = TenantRules()


def decision_for(body: str, role: SenderRole = SenderRole.CLIENT, **facts: object) -> Decision:
    return decide(InboundFacts(body, **facts), role, RULES)  # type: ignore[arg-type]


@pytest.mark.parametrize("word", sorted(OPT_OUT_KEYWORDS))
def test_every_opt_out_keyword_opts_out(word: str) -> None:
    decision = decision_for(word)
    assert decision.kind is DecisionKind.OPT_OUT
    assert decision.consent is ConsentIntent.OPT_OUT
    assert decision.reply == DEFAULT_OPT_OUT_REPLY


@pytest.mark.parametrize("word", sorted(OPT_IN_KEYWORDS))
def test_every_opt_in_keyword_opts_in(word: str) -> None:
    assert decision_for(word).kind is DecisionKind.OPT_IN


@pytest.mark.parametrize("word", sorted(HELP_KEYWORDS))
def test_every_help_keyword_asks_for_help(word: str) -> None:
    decision = decision_for(word)
    assert decision.kind is DecisionKind.HELP
    assert decision.reply == DEFAULT_HELP_REPLY


@pytest.mark.parametrize(
    "body",
    [
        "stop",
        "  Stop  ",
        "STOP!",
        "stop.",
        "Arrêt",
        "ARRÊT",
        "arrêt !",
        "\uff33\uff54\uff4f\uff50",
        "\tquit\n",
    ],
)
def test_keywords_ignore_case_accents_spaces_and_surrounding_punctuation(body: str) -> None:
    assert decision_for(body).kind is DecisionKind.OPT_OUT


@pytest.mark.parametrize("body", ["stop please", "STOP STOP", "don't stop", "stopped", "S TOP", ""])
def test_only_a_single_word_message_is_a_keyword(body: str) -> None:
    assert decision_for(body).consent is None


def test_normalise_keyword_strips_accents_with_nfkd() -> None:
    assert normalise_keyword("  Aïde ") == "AIDE"
    assert normalise_keyword("arrêt") == "ARRET"


def test_twilio_opt_out_type_wins_and_twilio_has_already_replied() -> None:
    decision = decision_for("Non merci", opt_out_type="STOP")
    assert decision.kind is DecisionKind.OPT_OUT
    assert decision.twilio_handled
    assert decision.reply is None


def test_twilio_opt_out_type_start_and_help_are_honoured() -> None:
    assert decision_for("OUI", opt_out_type="start").kind is DecisionKind.OPT_IN
    assert decision_for("?", opt_out_type="HELP").kind is DecisionKind.HELP


def test_an_unknown_opt_out_type_falls_back_to_our_keywords() -> None:
    assert decision_for("STOP", opt_out_type="SOMETHING").kind is DecisionKind.OPT_OUT


def test_sellers_consent_is_honoured_like_anyones_and_is_not_a_live_signal() -> None:
    decision = decision_for("STOP", SenderRole.SELLER)
    assert decision.kind is DecisionKind.OPT_OUT
    assert not decision.touches_live_session


def test_any_other_seller_message_is_a_live_signal() -> None:
    decision = decision_for("Robe rouge taille M, 25 €, code A12", SenderRole.SELLER)
    assert decision.kind is DecisionKind.LIVE_SIGNAL
    assert decision.live_signal is LiveSignalKind.SELLER_MESSAGE


@pytest.mark.parametrize("code", ["A12", "b7", "ABC1234", " A12 ", "z1"])
def test_a_client_item_code_is_a_live_signal(code: str) -> None:
    decision = decision_for(code)
    assert decision.kind is DecisionKind.LIVE_SIGNAL
    assert decision.live_signal is LiveSignalKind.ITEM_CODE


@pytest.mark.parametrize("body", ["A", "12", "ABCD1", "A12345", "A12 svp", "je veux A12", "merci"])
def test_other_client_text_is_not_a_live_signal(body: str) -> None:
    assert decision_for(body).kind is DecisionKind.CONVERSATION


@pytest.mark.parametrize("role", list(SenderRole))
@pytest.mark.parametrize("body", ["salut", "Salut !", "bonjour à tous", "Coucou 👋", "", "   "])
def test_greetings_and_empty_messages_never_touch_a_session(role: SenderRole, body: str) -> None:
    assert not decision_for(body, role).touches_live_session


@pytest.mark.parametrize("role", list(SenderRole))
def test_media_only_messages_never_touch_a_session(role: SenderRole) -> None:
    assert not decision_for("", role, media_count=2).touches_live_session


def test_the_item_code_pattern_is_configurable_per_tenant() -> None:
    rules = TenantRules(item_code=re.compile(r"^#\d+$"))
    assert decide(InboundFacts("#42"), SenderRole.CLIENT, rules).kind is DecisionKind.LIVE_SIGNAL
    assert decide(InboundFacts("A12"), SenderRole.CLIENT, rules).kind is DecisionKind.CONVERSATION


def test_tenant_keywords_add_to_the_standard_lists() -> None:
    keywords = ConsentKeywords().extended(opt_out=["Annuler"], opt_in=["oui"], help=["sos"])
    rules = TenantRules(keywords=keywords, replies=ConsentReplies(help="Appelez-nous"))
    assert decide(InboundFacts("annuler"), SenderRole.CLIENT, rules).kind is DecisionKind.OPT_OUT
    assert decide(InboundFacts("STOP"), SenderRole.CLIENT, rules).kind is DecisionKind.OPT_OUT
    assert decide(InboundFacts("Oui"), SenderRole.CLIENT, rules).kind is DecisionKind.OPT_IN
    assert decide(InboundFacts("SOS"), SenderRole.CLIENT, rules).reply == "Appelez-nous"


def test_a_keyword_cannot_mean_two_things() -> None:
    with pytest.raises(KeywordConflictError):
        ConsentKeywords().extended(opt_in=["stop"])
    with pytest.raises(KeywordConflictError):
        ConsentKeywords().extended(help=["two words"])


def test_rules_book_falls_back_to_the_default_rules() -> None:
    special = TenantRules(replies=ConsentReplies(help="x"))
    book = RulesBook(tenants={"t1": special})
    assert book.for_tenant("t1") is special
    assert book.for_tenant("t2") is book.default


def test_stop_is_confirmed_even_when_already_opted_out() -> None:
    decision = decision_for("STOP")
    assert consent_reply(decision, ConsentOutcome.CHANGED) == DEFAULT_OPT_OUT_REPLY
    assert consent_reply(decision, ConsentOutcome.UNCHANGED) == DEFAULT_OPT_OUT_REPLY


def test_an_opt_in_that_changed_nothing_gets_no_reply() -> None:
    decision = decision_for("YES")
    assert consent_reply(decision, ConsentOutcome.CHANGED) == DEFAULT_OPT_IN_REPLY
    assert consent_reply(decision, ConsentOutcome.UNCHANGED) is None


def test_a_stale_keyword_gets_no_reply() -> None:
    assert consent_reply(decision_for("STOP"), ConsentOutcome.STALE) is None
    assert consent_reply(decision_for("START"), ConsentOutcome.STALE) is None


@given(st.text(max_size=40))
def test_decide_never_fails_and_keywords_never_touch_sessions(body: str) -> None:
    for role in SenderRole:
        decision = decide(InboundFacts(body), role, RULES)
        if decision.consent is not None:
            assert not decision.touches_live_session
        if not body.strip():
            assert decision.kind is DecisionKind.CONVERSATION


@pytest.mark.parametrize(
    ("channel", "raw", "expected"),
    [
        (Channel.SMS, "+33612345678", "+33612345678"),
        (Channel.SMS, "+33 6 12 34 56 78", "+33612345678"),
        (Channel.WHATSAPP, " +33 6 12 34 56 78 ", "+33612345678"),
        (Channel.WHATSAPP, "US.13491208655302741918", "US.13491208655302741918"),
    ],
)
def test_addresses_are_normalised_for_the_consent_key(
    channel: Channel, raw: str, expected: str
) -> None:
    assert normalise_address(channel, raw) == expected


@pytest.mark.parametrize(
    ("channel", "raw"), [(Channel.SMS, "12"), (Channel.SMS, ""), (Channel.WHATSAPP, "+1")]
)
def test_impossible_addresses_are_refused(channel: Channel, raw: str) -> None:
    with pytest.raises(InvalidAddressError):
        normalise_address(channel, raw)


def test_default_replies_name_the_keywords_to_use() -> None:
    assert "START" in DEFAULT_OPT_OUT_REPLY
    assert "STOP" in DEFAULT_OPT_IN_REPLY


# --- who may lift an opt-out -------------------------------------------------------------------

_KEYWORD, _OPERATOR, _CARRIER = ConsentSource.KEYWORD, ConsentSource.OPERATOR, ConsentSource.CARRIER


def _change(state: ConsentState, source: ConsentSource) -> ConsentChange:
    contact = Contact("shop-1", Channel.WHATSAPP, "+33611111111")
    return ConsentChange(contact, state, datetime.now(UTC), source, actor="someone")


@pytest.mark.parametrize(
    ("opt_out", "state", "source"),
    [
        (None, ConsentState.OPTED_IN, _OPERATOR),
        (_OPERATOR, ConsentState.OPTED_IN, _OPERATOR),
        (_KEYWORD, ConsentState.OPTED_IN, _KEYWORD),
        (_CARRIER, ConsentState.OPTED_IN, _KEYWORD),
        (_KEYWORD, ConsentState.OPTED_OUT, _OPERATOR),
        (_CARRIER, ConsentState.OPTED_OUT, _OPERATOR),
    ],
)
def test_opt_outs_that_an_expression_may_lift_or_repeat(
    opt_out: ConsentSource | None, state: ConsentState, source: ConsentSource
) -> None:
    check_opt_in_may_lift(opt_out, _change(state, source))


@pytest.mark.parametrize("opt_out", [_KEYWORD, _CARRIER])
def test_only_the_persons_start_lifts_their_stop_or_carrier_opt_out(opt_out: ConsentSource) -> None:
    with pytest.raises(ConsentLockedError, match="only their own START"):
        check_opt_in_may_lift(opt_out, _change(ConsentState.OPTED_IN, _OPERATOR))


@pytest.mark.parametrize(
    ("channel", "scope", "covers", "lifts", "lock"),
    [
        (
            Channel.WHATSAPP,
            ConsentScope.PERSON,
            ConsentScope.PERSON,
            {"sms", "whatsapp", "person"},
            "person",
        ),
        (Channel.SMS, ConsentScope.CHANNEL, ConsentScope.CHANNEL, {"sms", "person"}, "person"),
        (Channel.MESSENGER, ConsentScope.PERSON, ConsentScope.CHANNEL, {"messenger"}, "messenger"),
    ],
)
def test_what_a_consent_change_covers_lifts_and_locks(
    channel: Channel, scope: ConsentScope, covers: ConsentScope, lifts: set[str], lock: str
) -> None:
    contact = Contact("shop-1", channel, "+33611111111")
    start = ConsentChange(
        contact,
        ConsentState.OPTED_IN,
        datetime.now(UTC),
        ConsentSource.KEYWORD,
        "routing",
        tenant_scope=scope,
    )
    assert start.scope is covers
    assert set(start.lifted_keys) == lifts
    assert contact.lock_key == ("shop-1", lock, "+33611111111")
