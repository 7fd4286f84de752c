"""Test accounts and webhook signing exactly as Twilio does it (the SDK's algorithm)."""

from __future__ import annotations

import uuid

from twilio.request_validator import RequestValidator

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "gateway-test-token"
OTHER_ACCOUNT_SID = "AC" + "2" * 32
OTHER_AUTH_TOKEN = "other-account-token"


def sign(public_url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> str:
    return RequestValidator(token).compute_signature(public_url, params)


def whatsapp_params(**overrides: str) -> dict[str, str]:
    """A WhatsApp inbound-message webhook body shaped like Twilio's."""
    sid = "SM" + uuid.uuid4().hex
    params = {
        "SmsMessageSid": sid,
        "NumMedia": "1",
        "ProfileName": "Aïcha 🛍️",
        "MessageType": "text",
        "SmsSid": sid,
        "WaId": "33612345678",
        "SmsStatus": "received",
        "Body": "A12",
        "To": "whatsapp:+14155238886",
        "NumSegments": "1",
        "ReferralNumMedia": "0",
        "MessageSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": "whatsapp:+33612345678",
        "ApiVersion": "2010-04-01",
        "MediaUrl0": "https://api.twilio.com/media/ME1",
        "MediaContentType0": "image/jpeg",
        "ChannelMetadata": '{"type":"whatsapp"}',
    }
    params.update(overrides)
    return params
