"""ListOptOuts page tokens: exact round trip, garbage refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.routing.api import InvalidRequestError, decode_page_token, encode_page_token


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 2, 5, 12, 0, 0, 123457, tzinfo=UTC),
        datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
    ],
)
def test_a_page_token_round_trips_to_the_microsecond(moment: datetime) -> None:
    assert decode_page_token(encode_page_token(moment, 42)) == (moment, 42)


def test_an_empty_token_is_the_first_page() -> None:
    assert decode_page_token("") is None


@pytest.mark.parametrize("token", ["%%%", "bm90LWEtdG9rZW4=", "MTI6"])
def test_a_forged_token_is_refused(token: str) -> None:
    with pytest.raises(InvalidRequestError):
        decode_page_token(token)
