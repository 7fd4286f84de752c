"""Tenant classes (the only tenant label the outbox's metrics carry) and the enqueue time read
from a message's UUIDv7 id."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from infra.config import ConfigError
from services.outbox.metrics import DEFAULT_TENANT_CLASS, TenantClasses, enqueued_at


def test_listed_tenants_get_their_class_and_every_other_one_is_standard() -> None:
    classes = TenantClasses.parse(" premium = shop-a, shop-b ; trial=shop-z ;")
    assert classes.of("shop-a") == classes.of("shop-b") == "premium"
    assert classes.of("shop-z") == "trial"
    assert classes.of("shop-unlisted") == DEFAULT_TENANT_CLASS == "standard"
    assert TenantClasses.parse("").of("shop-a") == "standard"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("premium", "is not class=tenant,tenant"),
        ("Premium=shop-a", "is not class=tenant,tenant"),
        ("premium=shop-a,,shop-b", "lists an empty tenant id"),
        ("premium=shop-a;trial=shop-a", "tenant 'shop-a' is in two classes"),
        (";".join(f"c{n}=shop-{n}" for n in range(9)), "at most 8 classes"),
    ],
)
def test_a_malformed_mapping_stops_the_process_at_start(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        TenantClasses.parse(text)


def test_the_enqueue_time_is_the_millisecond_timestamp_of_the_uuidv7_id() -> None:
    at = datetime(2026, 12, 7, 19, 30, 15, 123_000, tzinfo=UTC)
    milliseconds = int(at.timestamp() * 1000)
    # RFC 9562: 48 bits of Unix milliseconds, version 7, then random bits.
    message_id = uuid.UUID(int=(milliseconds << 80) | (0x7 << 76) | (0x8 << 60) | 0xABCDEF)
    assert message_id.version == 7
    assert enqueued_at(message_id) == at
    assert enqueued_at(uuid.uuid4()) is None
