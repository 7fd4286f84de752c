"""Checking a new message before it is stored: addresses per channel, sender, content,
keys, account and schedule. Pure; each failure is an `InvalidMessageError` whose text is
returned to the caller as is (INVALID_ARGUMENT)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from datetime import datetime, timedelta

import phonenumbers

from services.outbox.domain import (
    Channel,
    InvalidMessageError,
    address_prefix,
    is_messaging_service_sid,
)

MAX_BODY_CHARS = 1600
MAX_KEY_CHARS = 200
MAX_TEMPLATE_VARIABLES = 100
MAX_SCHEDULE_AHEAD = timedelta(days=30)
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_CONTENT_SID = re.compile(r"HX[0-9a-fA-F]{32}")
_ALPHANUMERIC_SENDER = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}")
# WhatsApp user IDs and Messenger page-scoped IDs: opaque, but never spaces or separators.
_OPAQUE_ID = re.compile(r"[A-Za-z0-9._\-]{1,128}")


# phonenumbers refuses to parse a longer string; refusing it here keeps it out of the cache.
_MAX_PARSED_CHARS = 250
# Distinct numbers cached (a few MB when full): the senders and the recipients of the moment; a
# stream of numbers never seen again (every message to someone new) only costs that memory.
E164_CACHE_SIZE = 16_384


def is_e164(value: str) -> bool:
    if not value.startswith("+") or not value[1:].isdigit() or len(value) > _MAX_PARSED_CHARS:
        return False
    return is_possible_number(value)


# Parsing costs ~3.6% of the outbox's CPU when done per enqueued message, and the same
# recipients and senders come back message after message: parse each distinct string once.
@functools.lru_cache(maxsize=E164_CACHE_SIZE)
def is_possible_number(value: str) -> bool:
    try:
        return phonenumbers.is_possible_number(phonenumbers.parse(value, None))
    except phonenumbers.NumberParseException:
        return False


def validate_recipient(channel: Channel, value: str) -> None:
    if channel is Channel.SMS and not is_e164(value):
        raise InvalidMessageError(f'recipient "{value}" is not an E.164 phone number')
    if channel is Channel.WHATSAPP and not (is_e164(value) or _OPAQUE_ID.fullmatch(value)):
        raise InvalidMessageError(f'recipient "{value}" is neither E.164 nor a WhatsApp user ID')
    if channel is Channel.MESSENGER and not _OPAQUE_ID.fullmatch(value):
        raise InvalidMessageError(f'recipient "{value}" is not a Messenger user ID')


def validate_sender(sender: str, channel: Channel) -> None:
    """A Messaging Service SID (any channel) or a `From` address of the recipient's channel."""
    if not sender:
        raise InvalidMessageError("sender is required")
    if is_messaging_service_sid(sender):
        return
    prefix = address_prefix(channel)
    if channel is Channel.SMS:
        if is_e164(sender) or _ALPHANUMERIC_SENDER.fullmatch(sender):
            return
        raise InvalidMessageError(f'sender "{sender}" is not an SMS number or sender ID')
    if not sender.startswith(prefix):
        raise InvalidMessageError(f'sender "{sender}" must start with "{prefix}" for {channel}')
    rest = sender[len(prefix) :]
    valid = is_e164(rest) if channel is Channel.WHATSAPP else bool(_OPAQUE_ID.fullmatch(rest))
    if not valid:
        raise InvalidMessageError(f'sender "{sender}" is not a valid {channel} address')


def validate_content(body: str | None, content_sid: str | None, variables: dict[str, str]) -> None:
    if (body is None) == (content_sid is None):
        raise InvalidMessageError("exactly one of body or template is required")
    if body is not None:
        if not body.strip():
            raise InvalidMessageError("body is empty")
        if len(body) > MAX_BODY_CHARS:
            raise InvalidMessageError(f"body is longer than {MAX_BODY_CHARS} characters")
        return
    if not _CONTENT_SID.fullmatch(content_sid or ""):
        raise InvalidMessageError(f'template content_sid "{content_sid}" is not HX + 32 hex')
    if len(variables) > MAX_TEMPLATE_VARIABLES:
        raise InvalidMessageError(f"a template takes at most {MAX_TEMPLATE_VARIABLES} variables")


def validate_key(name: str, value: str, *, required: bool) -> None:
    if required and not value:
        raise InvalidMessageError(f"{name} is required")
    if len(value) > MAX_KEY_CHARS:
        raise InvalidMessageError(f"{name} is longer than {MAX_KEY_CHARS} characters")


def validate_account_sid(account_sid: str, known: Iterable[str]) -> None:
    if not _ACCOUNT_SID.fullmatch(account_sid):
        raise InvalidMessageError(f'account_sid "{account_sid}" is not AC + 32 hex')
    if account_sid not in set(known):
        raise InvalidMessageError(f"account_sid {account_sid} is not configured for sending")


def validate_not_before(not_before: datetime | None, now: datetime) -> None:
    if not_before is not None and not_before - now > MAX_SCHEDULE_AHEAD:
        raise InvalidMessageError(
            f"not_before is more than {MAX_SCHEDULE_AHEAD.days} days in the future"
        )
