"""Parts of the Twilio HTTP adapter that need no server: Retry-After parsing and URL rewriting."""

from __future__ import annotations

import email.utils
import time

import pytest
from twilio.http.response import Response

from infra.twilio_http import TwilioApiHttpClient, make_twilio_client, retry_after_s


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": " 0.5 "}, 0.5),
        ({}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-3"}, 0.0),
    ],
)
def test_retry_after_reads_delta_seconds(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(Response(429, "{}", headers)) == expected


def test_retry_after_reads_an_http_date() -> None:
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    delay = retry_after_s(Response(429, "{}", {"Retry-After": in_a_minute}))
    assert delay is not None and 55 <= delay <= 60


def test_no_response_has_no_retry_after() -> None:
    assert retry_after_s(None) is None


def test_only_the_twilio_api_origin_is_rewritten() -> None:
    http = TwilioApiHttpClient("http://127.0.0.1:8089/")
    url = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json?PageSize=2"
    assert (
        http._rewrite(url)
        == "http://127.0.0.1:8089/2010-04-01/Accounts/AC1/Messages.json?PageSize=2"
    )
    other = "https://content.twilio.com/v1/Content"
    assert http._rewrite(other) == other
    assert TwilioApiHttpClient()._rewrite(url) == url


def test_client_uses_the_adapter_with_its_timeout() -> None:
    client = make_twilio_client("AC" + "1" * 32, "token", "http://127.0.0.1:1", timeout_s=2.5)
    assert isinstance(client.http_client, TwilioApiHttpClient)
    assert client.http_client.timeout == 2.5
    with pytest.raises(ValueError):
        TwilioApiHttpClient(timeout_s=0)
