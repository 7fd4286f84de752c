"""The live_catalog configuration: defaults, per-tenant settings, and one-line errors."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from infra.config import ConfigError
from services.live_catalog.config import load_config, parse_settings
from services.live_catalog.domain import Cancel, TenantSettings

HX = "HX" + "0123456789abcdef" * 2


@pytest.fixture(autouse=True)
def nats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:4222")
    for name in ("LIVE_CATALOG_HOLD_MINUTES", "LIVE_CATALOG_TENANT_SETTINGS", "GRPC_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    config = load_config()
    assert (config.grpc_port, config.metrics_port) == (50055, 9105)
    assert config.hold == timedelta(minutes=30)
    assert config.default_max_per_client == 1
    assert config.settings.for_tenant("any").summary_content_sid == ""


def test_a_tenant_gets_its_replies_keywords_and_template() -> None:
    raw = json.dumps(
        {
            "shop": {
                "replies": {"sold_out": "Plus de {code} !"},
                "cancel_keywords": ["retirer"],
                "summary_content_sid": HX,
            }
        }
    )
    book = parse_settings(raw, TenantSettings())
    shop = book.for_tenant("shop")
    assert shop.replies.render("sold_out", code="A1") == "Plus de A1 !"
    assert shop.grammar.parse_client("retirer A1") == Cancel("A1")
    assert shop.summary_content_sid == HX
    assert book.for_tenant("other").replies.render("sold_out", code="A1") == "A1 est épuisé."


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[", "LIVE_CATALOG_TENANT_SETTINGS is not valid JSON"),
        ("[]", "must be a JSON object keyed by tenant id"),
        ('{"s": {"colour": 1}}', "has unknown keys ['colour']"),
        ('{"s": {"replies": {"nope": "x"}}}', "unknown reply 'nope'"),
        ('{"s": {"summary_content_sid": "HX1"}}', "must be a Content SID"),
        ('{"s": {"item_code_pattern": "("}}', "is not a regular expression"),
        ('{"s": {"cancel_keywords": "x"}}', "must be a list of words"),
    ],
)
def test_bad_tenant_settings_are_refused_in_one_line(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings(raw, TenantSettings())
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_hold_out_of_range_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVE_CATALOG_HOLD_MINUTES", "0")
    with pytest.raises(ConfigError, match="LIVE_CATALOG_HOLD_MINUTES must be between 1 and"):
        load_config()
