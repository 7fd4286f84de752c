"""The gateway's pure rules: addresses, form-to-contract conversion, window counters."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from snapsell.common.v1.address_pb2 import Channel

from services.gateway.domain import (
    InvalidParameterError,
    MissingParameterError,
    WindowCounter,
    message_received,
    parse_form,
    status_received,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
NOW_NS = int(NOW.timestamp()) * 1_000_000_000


@pytest.mark.parametrize(
    ("raw", "channel", "value"),
    [
        ("whatsapp:+14155238886", Channel.CHANNEL_WHATSAPP, "+14155238886"),
        ("WhatsApp:+33612345678", Channel.CHANNEL_WHATSAPP, "+33612345678"),
        ("whatsapp:shop.fan.42", Channel.CHANNEL_WHATSAPP, "shop.fan.42"),
        ("messenger:1234567890", Channel.CHANNEL_MESSENGER, "1234567890"),
        ("+33612345678", Channel.CHANNEL_SMS, "+33612345678"),
        ("MG" + "a" * 32, Channel.CHANNEL_SMS, "MG" + "a" * 32),
    ],
)
def test_address_prefix_gives_channel_and_value_is_kept_as_given(raw, channel, value) -> None:
    message = message_received({"MessageSid": "SM1", "From": raw, "To": raw}, NOW_NS)
    for address in (message.sender, message.recipient):
        assert (address.channel, address.value) == (channel, value)


@pytest.mark.parametrize(
    "sender", ["whatsapp:0699887766", "whatsapp:33 6 99 88 77 66", "0699887766", "(415) 555-0123"]
)
def test_a_phone_number_sender_without_plus_and_country_code_is_refused(sender: str) -> None:
    params = {"MessageSid": "SM1", "From": sender, "To": "whatsapp:+14155238886"}
    with pytest.raises(InvalidParameterError, match=r"From is not an E\.164 phone number"):
        message_received(params, NOW_NS)


@pytest.mark.parametrize(
    "sender", ["whatsapp:+33699887766", "whatsapp:US.13491208655302741918", "12345", "AlphaShop"]
)
def test_e164_senders_short_codes_and_user_ids_are_accepted(sender: str) -> None:
    params = {"MessageSid": "SM1", "From": sender, "To": "whatsapp:+14155238886"}
    assert message_received(params, NOW_NS).sender.value == sender.removeprefix("whatsapp:")


def test_message_keeps_every_unknown_parameter_and_all_media() -> None:
    message = message_received(
        {
            "MessageSid": "SM1",
            "From": "whatsapp:+33612345678",
            "To": "whatsapp:+14155238886",
            "NumMedia": "2",
            "MediaUrl0": "u0",
            "MediaContentType0": "image/png",
            "MediaUrl1": "u1",
            "MediaContentType1": "audio/ogg",
            "Latitude": "48.85",
            "Longitude": "2.35",
            "Address": "Paris",
            "BrandNewTwilioParam": "kept",
        },
        NOW_NS,
    )
    assert [m.url for m in message.media] == ["u0", "u1"]
    assert message.location.latitude == pytest.approx(48.85)
    assert message.location.address == "Paris"
    assert dict(message.other_params) == {"NumMedia": "2", "BrandNewTwilioParam": "kept"}
    assert message.received_at.ToDatetime(tzinfo=UTC) == NOW


def test_message_without_sender_is_rejected_with_the_missing_name() -> None:
    with pytest.raises(MissingParameterError, match="From"):
        message_received({"MessageSid": "SM1", "To": "+1"}, NOW_NS)


def test_status_needs_sid_and_status() -> None:
    with pytest.raises(MissingParameterError, match="MessageStatus"):
        status_received({"MessageSid": "SM1"}, NOW_NS)
    status = status_received(
        {"MessageSid": "SM1", "MessageStatus": "read", "ErrorCode": ""}, NOW_NS
    )
    assert (status.message_status, status.error_code) == ("read", "")


def test_window_counter_limits_per_key_and_resets_each_window() -> None:
    now = [0.0]
    counter = WindowCounter(limit=2, window_s=60, clock=lambda: now[0])
    assert [counter.hit("a") for _ in range(3)] == [False, False, True]
    assert not counter.hit("b")
    now[0] = 60.0
    assert not counter.hit("a")


pairs = st.lists(st.tuples(st.text(max_size=12), st.text(max_size=40)), max_size=12)


@given(pairs)
def test_form_parsing_reads_what_urlencode_wrote_like_parse_qsl(items) -> None:
    body = urlencode(items)
    expected = parse_qsl(body, keep_blank_values=True)
    params = parse_form(body)
    assert params == dict(expected)
    for name in params:
        assert list(params.getall(name)) == [v for k, v in expected if k == name]


# Escapes of the separators (%26, %3D), backslashes and `x` (escapes are decoded as bytes
# escapes, `\\xXX`, by a codec) included.
@given(st.text(alphabet="abcdC36D89=&%+2Fé;\\x", max_size=60))
@example("a=\\x41%5Cx42%2&b=%C3%A9%\\")
def test_form_parsing_of_arbitrary_text_matches_parse_qsl(body: str) -> None:
    expected = parse_qsl(body, keep_blank_values=True)
    assert parse_form(body) == dict(expected)
