"""Routing's configuration: per-tenant consent rules and fail-fast validation."""

from __future__ import annotations

import json

import pytest

from infra.config import ConfigError
from services.routing.config import load_config, parse_rules
from services.routing.domain import (
    ConsentScope,
    DecisionKind,
    InboundFacts,
    SenderRole,
    TenantRules,
    decide,
)


def test_no_tenant_rules_means_the_defaults_for_everyone() -> None:
    book = parse_rules(None, TenantRules())
    assert book.for_tenant("any") is book.default


def test_tenant_rules_add_keywords_and_replace_replies_and_code_pattern() -> None:
    raw = json.dumps(
        {
            "shop-1": {
                "opt_out_keywords": ["Désabonner"],
                "help_reply": "Écrivez-nous sur le site",
                "item_code_pattern": r"^#\d+$",
            }
        }
    )
    rules = parse_rules(raw, TenantRules()).for_tenant("shop-1")
    assert decide(InboundFacts("desabonner"), SenderRole.CLIENT, rules).kind is DecisionKind.OPT_OUT
    assert decide(InboundFacts("STOP"), SenderRole.CLIENT, rules).kind is DecisionKind.OPT_OUT
    assert (
        decide(InboundFacts("aide"), SenderRole.CLIENT, rules).reply == "Écrivez-nous sur le site"
    )
    assert decide(InboundFacts("#3"), SenderRole.CLIENT, rules).kind is DecisionKind.LIVE_SIGNAL


def test_consent_is_per_person_unless_a_tenant_narrows_it_to_the_channel() -> None:
    book = parse_rules(
        json.dumps({"shop-1": {"consent_scope": "channel"}, "shop-2": {}}), TenantRules()
    )
    assert book.for_tenant("shop-1").consent_scope is ConsentScope.CHANNEL
    assert book.for_tenant("shop-2").consent_scope is ConsentScope.PERSON
    assert book.for_tenant("any").consent_scope is ConsentScope.PERSON


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"t": {"colour": 1}}', "unknown keys"),
        ('{"t": {"opt_in_keywords": ["STOP"]}}', "two meanings"),
        ('{"t": {"help_keywords": "HELP"}}', "list of strings"),
        ('{"t": {"help_reply": ""}}', "non-empty string"),
        ('{"t": {"item_code_pattern": "("}}', "regular expression"),
        ('{"t": {"consent_scope": "number"}}', "'person', 'channel'"),
    ],
)
def test_malformed_tenant_rules_fail_with_one_line(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_rules(raw, TenantRules())
    assert "\n" not in str(caught.value)


def test_load_config_reads_defaults_and_rejects_out_of_range_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:4222")
    config = load_config()
    assert config.grpc_port == 50051
    assert config.metrics_port == 9101
    assert config.db_pool_size >= config.concurrency
    monkeypatch.setenv("ROUTING_MAX_DELIVER", "1")
    with pytest.raises(ConfigError, match="ROUTING_MAX_DELIVER"):
        load_config()


def test_a_bad_global_item_code_pattern_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:4222")
    monkeypatch.setenv("ROUTING_ITEM_CODE_PATTERN", "[")
    with pytest.raises(ConfigError, match="ROUTING_ITEM_CODE_PATTERN"):
        load_config()
