"""Seller admin rules, free of I/O: what a valid tenant, channel address, phone number or
WhatsApp user ID is, and the resources they make up. Who may call what is in `access`.

Errors (one-line messages, safe to show to callers), mapped to gRPC codes by `api`:
- `InvalidArgumentError` — malformed input (a phone number, SID, tenant id, page token, ...);
- `PermissionDeniedError` — a tenant role naming another tenant (raised by `access`);
- `NotFoundError` / `AlreadyExistsError` — raised by the use cases, defined here so every
  error of the service comes from one hierarchy.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import phonenumbers


class SellerAdminError(Exception):
    """A request the service refuses; the message is one line meant for the caller."""


class InvalidArgumentError(SellerAdminError):
    pass


class PermissionDeniedError(SellerAdminError):
    pass


class NotFoundError(SellerAdminError):
    pass


class AlreadyExistsError(SellerAdminError):
    pass


# --- Tenants ----------------------------------------------------------------------------------

TENANT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DISPLAY_NAME_MAX_CHARS = 200


def validate_tenant_id(raw: str) -> str:
    tenant_id = raw.strip()
    if not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise InvalidArgumentError(
            f"tenant_id {quoted(raw)} must be 1-63 lowercase letters, digits, '-' or '_'"
        )
    return tenant_id


def new_tenant_id() -> str:
    return str(uuid.uuid4())


def validate_display_name(raw: str) -> str:
    name = raw.strip()
    if not name:
        raise InvalidArgumentError("display_name is required")
    if len(name) > DISPLAY_NAME_MAX_CHARS:
        raise InvalidArgumentError(f"display_name is longer than {DISPLAY_NAME_MAX_CHARS} chars")
    if any(not ch.isprintable() for ch in name):
        raise InvalidArgumentError("display_name contains control characters")
    return name


# --- Phone numbers and WhatsApp user IDs ------------------------------------------------------

_PARSE_ERROR_REASONS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "has an unknown country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "is not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "is too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "is too short",
    phonenumbers.NumberParseException.TOO_LONG: "is too long",
}
_POSSIBILITY_REASONS = {
    phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "has an unknown country code",
    phonenumbers.ValidationResult.TOO_SHORT: "is too short",
    phonenumbers.ValidationResult.TOO_LONG: "is too long",
    phonenumbers.ValidationResult.INVALID_LENGTH: "has the wrong number of digits",
}
_PHONE_MAX_CHARS = 40
_WHATSAPP_PREFIX = "whatsapp:"


def normalize_phone_number(raw: str) -> str:
    """`+33 6 12 34 56 78` -> `+33612345678`; anything not a valid international number raises
    `InvalidArgumentError` saying why."""
    text = raw.strip()
    if not text:
        raise InvalidArgumentError("phone number is empty")
    if len(text) > _PHONE_MAX_CHARS:
        raise InvalidArgumentError(f"phone number {quoted(raw)} is too long")
    if not text.startswith("+"):
        raise InvalidArgumentError(
            f"phone number {quoted(raw)} must start with + and the country code"
        )
    # phonenumbers reads letters as a keypad (1-800-FLOWERS); a seller's number never has any.
    if any(ch.isalpha() for ch in text):
        raise InvalidArgumentError(f"phone number {quoted(raw)} contains letters")
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        reason = _PARSE_ERROR_REASONS.get(exc.error_type, "is not a phone number")
        raise InvalidArgumentError(f"phone number {quoted(raw)} {reason}") from None
    possibility = phonenumbers.is_possible_number_with_reason(parsed)
    if possibility in _POSSIBILITY_REASONS:
        reason = _POSSIBILITY_REASONS[possibility]
        raise InvalidArgumentError(f"phone number {quoted(raw)} {reason}")
    if parsed.extension:
        raise InvalidArgumentError(f"phone number {quoted(raw)} has an extension")
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidArgumentError(
            f"phone number {quoted(raw)} is not a valid number"
            f" for country code +{parsed.country_code}"
        )
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


# Meta's business-scoped user ID: ISO country code, ".", optionally "ENT." (a parent ID shared
# by managed businesses), then up to 128 letters and digits, e.g. US.13491208655302741918.
WHATSAPP_USER_ID_PATTERN = re.compile(r"[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]{1,128}")


def normalize_whatsapp_user_id(raw: str) -> str:
    """A WhatsApp user ID kept exactly as WhatsApp sends it, except an upper-cased country code.

    Phone numbers are refused here: they are registered as phone numbers, in E.164."""
    text = raw.strip()
    if text.lower().startswith(_WHATSAPP_PREFIX):
        text = text[len(_WHATSAPP_PREFIX) :]
    if not text:
        raise InvalidArgumentError("WhatsApp user ID is empty")
    if text.startswith("+") or text.replace(" ", "").isdigit():
        raise InvalidArgumentError(
            f"WhatsApp user ID {quoted(raw)} looks like a phone number;"
            " register it as a phone number"
        )
    candidate = text[:2].upper() + text[2:]
    if not re.match(r"[A-Z]{2}\.", candidate):
        raise InvalidArgumentError(
            f"WhatsApp user ID {quoted(raw)} must start with a two-letter country code and a dot"
            " (US.13491208655302741918)"
        )
    if not WHATSAPP_USER_ID_PATTERN.fullmatch(candidate):
        raise InvalidArgumentError(
            f"WhatsApp user ID {quoted(raw)} must be a country code, a dot and up to 128 letters"
            " or digits"
        )
    return candidate


class SellerPhoneKind(StrEnum):
    PHONE_NUMBER = "phone"
    WHATSAPP_USER_ID = "wa_id"


@dataclass(frozen=True, slots=True)
class SellerAddress:
    kind: SellerPhoneKind
    value: str


def parse_seller_address(
    *, phone_number: str | None, whatsapp_user_id: str | None
) -> SellerAddress:
    if phone_number is not None:
        return SellerAddress(SellerPhoneKind.PHONE_NUMBER, normalize_phone_number(phone_number))
    if whatsapp_user_id is not None:
        return SellerAddress(
            SellerPhoneKind.WHATSAPP_USER_ID, normalize_whatsapp_user_id(whatsapp_user_id)
        )
    raise InvalidArgumentError("phone_number or whatsapp_user_id is required")


def sender_candidates(sender: str, whatsapp_id: str) -> list[str]:
    """The seller-phone addresses an inbound sender may be registered under: its `From` value
    and its WhatsApp ID (Twilio's `WaId`). A WaId of digits is the phone number without `+`."""
    candidates = [sender] if sender else []
    if whatsapp_id:
        candidates.append(f"+{whatsapp_id}" if whatsapp_id.isdigit() else whatsapp_id)
    return candidates


def mask_address(address: str) -> str:
    """`+33612345678` -> `+33******78`, `US.13491208655302741918` -> `US.******18`:
    enough to tell entries apart in an audit trail, not enough to contact the person."""
    if len(address) <= 8:
        return "*" * len(address)
    # Same shape as infra.log.mask_phone, so logs and audit events read alike.
    return f"{address[:3]}******{address[-2:]}"


# --- Channels ---------------------------------------------------------------------------------


class ChannelKind(StrEnum):
    WHATSAPP = "whatsapp"
    SMS = "sms"
    MESSAGING_SERVICE = "messaging_service"


_MESSAGING_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")


@dataclass(frozen=True, slots=True)
class ChannelAddress:
    kind: ChannelKind
    # E.164 number for WhatsApp/SMS, the SID for a Messaging Service.
    value: str

    @property
    def canonical(self) -> str:
        """The form Twilio uses: `whatsapp:+14155238886`, `+14155238886` or `MG...`."""
        return sender_address_key(self.kind, self.value)


def sender_address_key(kind: ChannelKind, value: str) -> str:
    return f"{_WHATSAPP_PREFIX}{value}" if kind is ChannelKind.WHATSAPP else value


def parse_channel_address(raw: str) -> ChannelAddress:
    text = raw.strip()
    if not text:
        raise InvalidArgumentError("address is required")
    if text[:2].upper() == "MG":
        if not _MESSAGING_SERVICE_SID.fullmatch("MG" + text[2:]):
            raise InvalidArgumentError(
                f"Messaging Service SID {quoted(raw)} must be MG followed by 32 hex digits"
            )
        return ChannelAddress(ChannelKind.MESSAGING_SERVICE, "MG" + text[2:].lower())
    if text.lower().startswith(_WHATSAPP_PREFIX):
        number = normalize_phone_number(text[len(_WHATSAPP_PREFIX) :])
        return ChannelAddress(ChannelKind.WHATSAPP, number)
    prefix, colon, _ = text.partition(":")
    if colon:
        raise InvalidArgumentError(
            f"address {quoted(raw)}: channel {quoted(prefix)} is not supported"
            " (use whatsapp:+<number>, +<number> for SMS, or an MG... SID)"
        )
    return ChannelAddress(ChannelKind.SMS, normalize_phone_number(text))


# Twilio's alphanumeric sender IDs: 1-11 letters, digits or spaces, at least one letter.
_ALPHANUMERIC_SENDER_ID = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}")


def validate_alphanumeric_sender_id(raw: str, kind: ChannelKind) -> str | None:
    """None when none is declared; only SMS channels and Messaging Services send under one."""
    text = raw.strip()
    if not text:
        return None
    if kind is ChannelKind.WHATSAPP:
        raise InvalidArgumentError(
            "alphanumeric sender IDs are for SMS numbers and Messaging Services, not WhatsApp"
        )
    if not _ALPHANUMERIC_SENDER_ID.fullmatch(text):
        raise InvalidArgumentError(
            f"alphanumeric sender ID {quoted(raw)} must be 1-11 letters, digits or spaces,"
            " with at least one letter"
        )
    return text


def validate_account_sid(raw: str) -> str:
    text = raw.strip()
    if not _ACCOUNT_SID.fullmatch(text):
        raise InvalidArgumentError(
            f"account_sid {quoted(raw)} must be AC followed by 32 hex digits"
        )
    return "AC" + text[2:].lower()


# --- Resources --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tenant:
    tenant_id: str
    display_name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Channel:
    channel_id: uuid.UUID
    tenant_id: str
    address: ChannelAddress
    account_sid: str
    created_at: datetime
    alphanumeric_sender_id: str | None = None


@dataclass(frozen=True, slots=True)
class SellerPhone:
    seller_phone_id: uuid.UUID
    tenant_id: str
    address: SellerAddress
    created_at: datetime


class SenderRole(StrEnum):
    SELLER = "seller"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class ResolvedSender:
    tenant_id: str
    channel_id: uuid.UUID
    role: SenderRole


def quoted(raw: str, limit: int = 48) -> str:
    """A caller's value inside a one-line message: quoted, control characters escaped, cut short."""
    text = raw if len(raw) <= limit else raw[:limit] + "…"
    return json.dumps(text, ensure_ascii=False)
