"""The gateway's pure rules: addresses, form-to-contract conversion, window counters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from snapsell.common.v1.address_pb2 import Channel

from services.gateway.domain import (
    MissingParameterError,
    WindowCounter,
    message_received,
    parse_address,
    status_received,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


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
    address = parse_address(raw)
    assert (address.channel, address.value) == (channel, value)


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
        NOW,
    )
    assert [m.url for m in message.media] == ["u0", "u1"]
    assert message.location.latitude == pytest.approx(48.85)
    assert message.location.address == "Paris"
    assert dict(message.other_params) == {"NumMedia": "2", "BrandNewTwilioParam": "kept"}
    assert message.received_at.ToDatetime(tzinfo=UTC) == NOW


def test_message_without_sender_is_rejected_with_the_missing_name() -> None:
    with pytest.raises(MissingParameterError, match="From"):
        message_received({"MessageSid": "SM1", "To": "+1"}, NOW)


def test_status_needs_sid_and_status() -> None:
    with pytest.raises(MissingParameterError, match="MessageStatus"):
        status_received({"MessageSid": "SM1"}, NOW)
    status = status_received({"MessageSid": "SM1", "MessageStatus": "read", "ErrorCode": ""}, NOW)
    assert (status.message_status, status.error_code) == ("read", "")


def test_window_counter_limits_per_key_and_resets_each_window() -> None:
    now = [0.0]
    counter = WindowCounter(limit=2, window_s=60, clock=lambda: now[0])
    assert [counter.hit("a") for _ in range(3)] == [False, False, True]
    assert counter.over_limit("a") and not counter.over_limit("b")
    now[0] = 60.0
    assert not counter.over_limit("a")
    assert not counter.hit("a")
