"""Page tokens: an exact round trip for the tokens a response carries, and every other text
refused with the same one-line error."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.page_tokens import INT64_MAX, InvalidPageTokenError, PageTokens

OPT_OUTS = PageTokens("test.opt_outs", (datetime, int))
SESSIONS = PageTokens("test.sessions", (datetime, uuid.UUID))
PHONES = PageTokens("test.phones", (str,))


def raw_token(*payload: object) -> str:
    """A token in the current format with any payload, as a forger would write it."""
    return base64.urlsafe_b64encode(json.dumps(list(payload)).encode()).decode().rstrip("=")


@given(
    st.datetimes(timezones=st.just(UTC)),
    st.integers(min_value=0, max_value=INT64_MAX),
    st.text(max_size=20),
)
def test_tokens_round_trip_exactly(moment: datetime, row_id: int, tenant: str) -> None:
    assert OPT_OUTS.decode(OPT_OUTS.encode(tenant, moment, row_id), tenant) == (moment, row_id)


@given(st.text(max_size=100).filter(lambda text: "\0" not in text))
def test_text_keys_round_trip(address: str) -> None:
    token = PHONES.encode("shop-1", address)
    assert token.isascii()
    assert PHONES.decode(token, "shop-1") == (address,)


def test_an_empty_token_is_the_first_page() -> None:
    assert OPT_OUTS.decode("", "shop-1") is None


NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
MICROS = 1_796_644_800_000_000


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("%%%", id="not-base64"),
        pytest.param(base64.urlsafe_b64encode(b"\xff\xfe").decode(), id="not-json"),
        pytest.param(raw_token(2, "test.opt_outs", "shop-1", MICROS, 1), id="other-version"),
        pytest.param(OPT_OUTS.encode("shop-2", NOW, 1), id="other-tenant"),
        pytest.param(SESSIONS.encode("shop-1", NOW, uuid.uuid4()), id="other-list"),
        pytest.param(raw_token(1, "test.opt_outs", "shop-1", MICROS, 2**63), id="beyond-int64"),
        pytest.param(raw_token(1, "test.opt_outs", "shop-1", MICROS, -1), id="negative-id"),
        pytest.param(raw_token(1, "test.opt_outs", "shop-1", 10**30, 1), id="huge-time"),
        pytest.param(raw_token(1, "test.opt_outs", "shop-1", MICROS, True), id="bool-id"),
        pytest.param(raw_token(1, "test.opt_outs", "shop-1", MICROS, 1.5), id="float-id"),
        pytest.param(raw_token(1, "test.opt_outs", "shop-1", MICROS), id="short-key"),
        pytest.param(OPT_OUTS.encode("shop-1", NOW, 1) + "=", id="padded"),
        pytest.param(OPT_OUTS.encode("shop-1", NOW, 1) + "!", id="stray-character"),
        pytest.param("A" * 2000, id="too-long"),
        pytest.param(base64.urlsafe_b64encode(b"[" * 700).decode(), id="deep-json"),
    ],
)
def test_forged_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidPageTokenError, match=r"^invalid page_token$"):
        OPT_OUTS.decode(token, "shop-1")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param([1, "test.sessions", "shop-1", MICROS, "not-a-uuid"], id="not-a-uuid"),
        pytest.param(
            [1, "test.sessions", "shop-1", MICROS, str(uuid.UUID(int=1)).upper()],
            id="uuid-spelling",
        ),
    ],
)
def test_a_uuid_key_must_be_a_canonical_uuid(payload: list[object]) -> None:
    with pytest.raises(InvalidPageTokenError):
        SESSIONS.decode(raw_token(*payload), "shop-1")


def test_text_keys_with_nul_are_refused() -> None:
    with pytest.raises(InvalidPageTokenError):
        PHONES.decode(raw_token(1, "test.phones", "shop-1", "+3361\0"), "shop-1")
