"""Phone numbers, WhatsApp user IDs, channel addresses and other inputs of seller_admin."""

from __future__ import annotations

import re

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.seller_admin.domain import (
    ChannelKind,
    InvalidArgumentError,
    SellerPhoneKind,
    mask_address,
    normalize_phone_number,
    normalize_whatsapp_user_id,
    parse_channel_address,
    parse_seller_address,
    sender_candidates,
    validate_account_sid,
    validate_display_name,
    validate_tenant_id,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+33 6 12 34 56 78", "+33612345678"),
        ("+33612345678", "+33612345678"),
        ("  +33.6.12.34.56.78 ", "+33612345678"),
        ("+33 (0)6 12 34 56 78", "+33612345678"),
        ("+1 (415) 523-8886", "+14155238886"),
        ("+44 20 7946 0958", "+442079460958"),
    ],
)
def test_valid_numbers_are_normalised_to_e164(raw: str, expected: str) -> None:
    assert normalize_phone_number(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "is empty"),
        ("06 12 34 56 78", "must start with + and the country code"),
        ("33612345678", "must start with + and the country code"),
        ("+1 800 FLOWERS", "contains letters"),
        ("+3361234567", "is too short"),
        ("+336123456789012", "is too long"),
        ("+999 123456", "unknown country code"),
        ("+1 555 555 5555", "is not a valid number for country code +1"),
        ("+33612345678#5", "has an extension"),
        ("+" + "1" * 60, "is too long"),
    ],
)
def test_invalid_numbers_are_refused_with_the_reason(raw: str, reason: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(reason)):
        normalize_phone_number(raw)


_REGIONS_WITH_MOBILES = sorted(
    region
    for region in phonenumbers.SUPPORTED_REGIONS
    if phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
)


@given(
    region=st.sampled_from(_REGIONS_WITH_MOBILES),
    style=st.sampled_from(
        [phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164]
    ),
)
def test_any_valid_mobile_in_any_layout_normalises_to_its_e164(region: str, style: int) -> None:
    number = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    assert normalize_phone_number(phonenumbers.format_number(number, style)) == e164
    assert normalize_phone_number(e164) == e164


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_arbitrary_text_is_either_e164_or_refused_in_one_line(raw: str) -> None:
    try:
        normalized = normalize_phone_number(raw)
    except InvalidArgumentError as error:
        assert "\n" not in str(error)
        assert len(str(error)) < 200
    else:
        assert normalized.startswith("+")
        assert normalized[1:].isdigit()
        assert normalized.isascii()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("US.13491208655302741918", "US.13491208655302741918"),
        ("BR.1502576394655843", "BR.1502576394655843"),
        ("US.ENT.11815799212886844830", "US.ENT.11815799212886844830"),
        ("whatsapp:FR.AbC123", "FR.AbC123"),
        (" us.13491208655302741918 ", "US.13491208655302741918"),
    ],
)
def test_whatsapp_user_ids_are_accepted_as_sent(raw: str, expected: str) -> None:
    assert normalize_whatsapp_user_id(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "is empty"),
        ("+33612345678", "looks like a phone number"),
        ("33612345678", "looks like a phone number"),
        ("13491208655302741918x", "two-letter country code and a dot"),
        ("USA.1349", "two-letter country code and a dot"),
        ("US.", "up to 128 letters"),
        ("US.1349-1208", "up to 128 letters"),
        ("US." + "1" * 129, "up to 128 letters"),
    ],
)
def test_malformed_whatsapp_user_ids_are_refused(raw: str, reason: str) -> None:
    with pytest.raises(InvalidArgumentError, match=reason):
        normalize_whatsapp_user_id(raw)


def test_seller_address_takes_the_kind_from_the_field_used() -> None:
    phone = parse_seller_address(phone_number="+33 6 12 34 56 78", whatsapp_user_id=None)
    user = parse_seller_address(phone_number=None, whatsapp_user_id="US.1349")
    assert (phone.kind, phone.value) == (SellerPhoneKind.PHONE_NUMBER, "+33612345678")
    assert (user.kind, user.value) == (SellerPhoneKind.WHATSAPP_USER_ID, "US.1349")
    with pytest.raises(InvalidArgumentError, match="phone_number or whatsapp_user_id"):
        parse_seller_address(phone_number=None, whatsapp_user_id=None)


@pytest.mark.parametrize(
    ("raw", "kind", "canonical"),
    [
        ("whatsapp:+14155238886", ChannelKind.WHATSAPP, "whatsapp:+14155238886"),
        ("WhatsApp:+1 415 523 8886", ChannelKind.WHATSAPP, "whatsapp:+14155238886"),
        ("+1 415-523-8886", ChannelKind.SMS, "+14155238886"),
        ("MG" + "A" * 32, ChannelKind.MESSAGING_SERVICE, "MG" + "a" * 32),
        ("mg" + "0123abcd" * 4, ChannelKind.MESSAGING_SERVICE, "MG" + "0123abcd" * 4),
    ],
)
def test_channel_addresses_parse_to_twilio_canonical_form(
    raw: str, kind: ChannelKind, canonical: str
) -> None:
    address = parse_channel_address(raw)
    assert address.kind is kind
    assert address.canonical == canonical


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "address is required"),
        ("MG123", "MG followed by 32 hex digits"),
        ("MG" + "z" * 32, "MG followed by 32 hex digits"),
        ("messenger:1234567890", 'channel "messenger" is not supported'),
        ("whatsapp:0612345678", "must start with +"),
        ("whatsapp:US.1349", "must start with +"),
    ],
)
def test_malformed_channel_addresses_are_refused(raw: str, reason: str) -> None:
    with pytest.raises(InvalidArgumentError, match=reason):
        parse_channel_address(raw)


def test_account_sid_must_be_ac_and_32_hex_digits() -> None:
    assert validate_account_sid(" AC" + "F" * 32) == "AC" + "f" * 32
    for bad in ("", "AC123", "MG" + "0" * 32, "AC" + "g" * 32):
        with pytest.raises(InvalidArgumentError, match="account_sid"):
            validate_account_sid(bad)


def test_tenant_ids_are_lowercase_slugs() -> None:
    assert validate_tenant_id("boutique-marie_2") == "boutique-marie_2"
    for bad in ("", "Boutique", "-lead", "a b", "a" * 64, "é"):
        with pytest.raises(InvalidArgumentError, match="tenant_id"):
            validate_tenant_id(bad)


def test_display_names_are_trimmed_and_must_be_printable() -> None:
    assert validate_display_name("  Chez Marie  ") == "Chez Marie"
    for bad, reason in (("", "required"), ("a" * 201, "longer"), ("a\nb", "control")):
        with pytest.raises(InvalidArgumentError, match=reason):
            validate_display_name(bad)


def test_masking_keeps_only_the_ends() -> None:
    assert mask_address("+33612345678") == "+33******78"
    assert mask_address("US.13491208655302741918") == "US.******18"
    assert mask_address("US.1349") == "*******"


def test_a_sender_matches_by_from_and_by_whatsapp_id() -> None:
    assert sender_candidates("+33612345678", "") == ["+33612345678"]
    assert sender_candidates("US.1349", "US.1349") == ["US.1349", "US.1349"]
    # Twilio's WaId for a number-visible user is the number's digits.
    assert sender_candidates("US.1349", "33612345678") == ["US.1349", "+33612345678"]
    assert sender_candidates("", "") == []
