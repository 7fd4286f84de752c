"""Twilio's checks on a create-message form, with its error codes."""

from __future__ import annotations

import re
from collections.abc import Mapping

from phonenumbers import COUNTRY_CODE_TO_REGION_CODE
from starlette.responses import Response

from tools.twilio_sandbox.errors import twilio_error

MAX_BODY_CHARS = 1600
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def is_valid_recipient(to: str) -> bool:
    """E.164 with a known country code, optionally behind a channel prefix (`whatsapp:`).

    A shape check, not full numbering-plan validation: phonenumbers' parse costs ~100 µs, too
    much for a server that must not be a benchmark's bottleneck; senders validate upstream.
    """
    number = to.partition(":")[2] if ":" in to else to
    if _E164.fullmatch(number) is None:
        return False
    return any(int(number[1 : 1 + n]) in COUNTRY_CODE_TO_REGION_CODE for n in (1, 2, 3))


def invalid_create_request(form: Mapping[str, str]) -> Response | None:
    """Twilio's 400 answer for a form it would refuse, in Twilio's order of checks; else None."""
    to = form.get("To", "")
    if not to:
        return twilio_error(21604)
    if not is_valid_recipient(to):
        return twilio_error(21211, to=to)
    if not form.get("From") and not form.get("MessagingServiceSid"):
        return twilio_error(21603)
    if not form.get("Body") and not form.get("ContentSid") and not form.get("MediaUrl"):
        return twilio_error(21602)
    if len(form.get("Body", "")) > MAX_BODY_CHARS:
        return twilio_error(21617)
    return None
