"""Pure rules of the gateway: Twilio's form parameters to contract messages, and the counters
behind its abuse limits. No I/O here."""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import unquote_to_bytes

from snapsell.common.v1.address_pb2 import Address, Channel
from snapsell.gateway.v1.events_pb2 import Media, MessageReceived, StatusReceived

_PREFIXES = {"whatsapp": Channel.CHANNEL_WHATSAPP, "messenger": Channel.CHANNEL_MESSENGER}

# Form parameters carried by a dedicated field; everything else lands in `other_params`.
_MESSAGE_FIELDS = {
    "MessageSid": "message_sid",
    "AccountSid": "account_sid",
    "MessagingServiceSid": "messaging_service_sid",
    "Body": "body",
    "ProfileName": "profile_name",
    "WaId": "wa_id",
    "OptOutType": "opt_out_type",
    "ButtonPayload": "button_payload",
    "ButtonText": "button_text",
}
_LOCATION_FIELDS = {"Latitude", "Longitude", "Address", "Label"}
_STATUS_FIELDS = {
    "MessageSid": "message_sid",
    "AccountSid": "account_sid",
    "MessageStatus": "message_status",
    "ErrorCode": "error_code",
    "ErrorMessage": "error_message",
}
MAX_MEDIA = 10
_MEDIA_KEYS = [(f"MediaUrl{i}", f"MediaContentType{i}") for i in range(MAX_MEDIA)]
_MEDIA_URLS = {url for url, _ in _MEDIA_KEYS}
_MESSAGE_KNOWN = {
    *_MESSAGE_FIELDS,
    "From",
    "To",
    *_LOCATION_FIELDS,
    *(key for pair in _MEDIA_KEYS for key in pair),
}
_STATUS_KNOWN = {*_STATUS_FIELDS, "From", "To"}


# Twilio's signature covers the URL and then each name and value with no separator, so a
# value can swallow the parameters after it (`MessageSid=SM…NumMedia0` in place of
# `MessageSid=SM…&NumMedia=0`) and keep a valid signature, with a MessageSid de-duplication
# has never seen. Identifiers of a fixed shape close that door.
SID_FORMATS = {
    "MessageSid": re.compile(r"(SM|MM)[0-9a-f]{32}"),
    "SmsSid": re.compile(r"(SM|MM)[0-9a-f]{32}"),
    "AccountSid": re.compile(r"AC[0-9a-f]{32}"),
    "MessagingServiceSid": re.compile(r"MG[0-9a-f]{32}"),
}


# A phone number without its `+` and country code (`whatsapp:0699887766`): Twilio always sends
# E.164, so this sender was not written by Twilio and cannot be keyed for consent or matched to a
# seller. Up to six digits is an SMS short code, which is kept; a WhatsApp user ID has letters.
_NATIONAL_NUMBER = re.compile(r"[\d\s().-]*\d[\d\s().-]*")
_SHORT_CODE_MAX_DIGITS = 6


class ParameterError(ValueError):
    """A signed webhook's parameters are not what Twilio sends; the message is one line."""


class MissingParameterError(ParameterError):
    """A signed webhook lacks a parameter Twilio always sends."""


class InvalidParameterError(ParameterError):
    """A signed webhook has a repeated parameter or an identifier of the wrong shape."""


def check_signed_form(params: FormParams) -> None:
    """Refuse what Twilio never sends: a repeated name, or a SID that is not one."""
    if repeated := params.repeated():
        raise InvalidParameterError(f"repeated parameter {', '.join(sorted(repeated))}")
    for name, pattern in SID_FORMATS.items():
        value = params.get(name)
        if value is not None and not pattern.fullmatch(value):
            raise InvalidParameterError(f"{name} is not a Twilio SID")


class FormParams(dict[str, str]):
    """Form parameters, the last value of each name.

    `getall` is the multi-dict interface the twilio SDK's signature algorithm asks for first:
    it keeps every value of a repeated name in the signature, as Twilio computes it, and
    spares the SDK its per-parameter fallbacks. Build with `of`."""

    @staticmethod
    def of(pairs: list[tuple[str, str]]) -> FormParams:
        params = FormParams(pairs)
        return params if len(params) == len(pairs) else _RepeatedFormParams(pairs)

    def getall(self, name: str) -> Sequence[str]:
        return (self[name],)

    def repeated(self) -> list[str]:
        """The names that came more than once."""
        return []


class _RepeatedFormParams(FormParams):
    """Form parameters where some name came more than once (Twilio never repeats one)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__(pairs)
        self.every: dict[str, list[str]] = {}
        for name, value in pairs:
            self.every.setdefault(name, []).append(value)

    def getall(self, name: str) -> Sequence[str]:
        return self.every[name]

    def repeated(self) -> list[str]:
        return [name for name, values in self.every.items() if len(values) > 1]


def _unquote_plus(text: str) -> str:
    """`urllib.parse.unquote_plus`, with the escapes decoded in C: Twilio's JSON parameters are
    mostly escapes. Each `%XX` becomes the bytes escape `\\xXX` for `codecs.escape_decode`,
    backslashes doubled first so that no other escape is read. An invalid escape (`%zz`, a
    trailing `%`) fails the codec; then the escapes are read one by one, invalid ones kept as
    they are, as the standard library does."""
    text = text.replace("+", " ")
    try:
        raw = codecs.escape_decode(text.replace("\\", "\\\\").replace("%", "\\x"))[0]
    except ValueError:
        raw = unquote_to_bytes(text)
    return raw.decode("utf-8", "replace")


def parse_form(body: str) -> FormParams:
    """`application/x-www-form-urlencoded` to parameters, as `urllib.parse.parse_qsl` with
    `keep_blank_values=True` reads it: a webhook's hot path. The body is decoded in one pass,
    then split, unless an escape stood for `&` or `=` (decoding added some); then each name and
    value is decoded on its own. Both read the same: an escape never spans a separator, and
    the UTF-8 decoder never takes an ASCII byte into an invalid sequence it replaces."""
    decoded = _unquote_plus(body)
    if decoded.count("&") == body.count("&") and decoded.count("=") == body.count("="):
        pairs = [pair.partition("=") for pair in decoded.split("&") if pair]
        return FormParams.of([(name, value) for name, _, value in pairs])
    pairs = [pair.partition("=") for pair in body.split("&") if pair]
    return FormParams.of([(_unquote_plus(name), _unquote_plus(value)) for name, _, value in pairs])


def _fill_address(address: Address, raw: str) -> None:
    """`whatsapp:+14155238886` -> (WHATSAPP, "+14155238886"); no prefix means SMS. The value
    is kept as given: a WhatsApp user ID is not a phone number."""
    prefix, sep, rest = raw.partition(":")
    channel = _PREFIXES.get(prefix.lower()) if sep else None
    if channel is None:
        address.channel, address.value = Channel.CHANNEL_SMS, raw.strip()
    else:
        address.channel, address.value = channel, rest.strip()


def _check_sender(address: Address) -> None:
    """Refuse a phone-number sender that is not E.164 (see `_NATIONAL_NUMBER`)."""
    value = address.value
    if (
        address.channel != Channel.CHANNEL_MESSENGER
        and _NATIONAL_NUMBER.fullmatch(value)
        and sum(c.isdigit() for c in value) > _SHORT_CODE_MAX_DIGITS
    ):
        raise InvalidParameterError("From is not an E.164 phone number (+ and country code)")


def _require(params: Mapping[str, str], *names: str) -> None:
    missing = [name for name in names if not params.get(name)]
    if missing:
        raise MissingParameterError(f"missing {', '.join(missing)}")


def _float(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


# Messages are filled in place, field by field, in one pass over the parameters: a webhook's
# hot path, where building sub-messages to copy them in costs twice as much.


def message_received(params: Mapping[str, str], received_at_ns: int) -> MessageReceived:
    """The contract message for an inbound-message webhook."""
    _require(params, "MessageSid", "From", "To")
    message = MessageReceived()
    _fill_address(message.sender, params["From"])
    _check_sender(message.sender)
    _fill_address(message.recipient, params["To"])
    message.received_at.FromNanoseconds(received_at_ns)
    other, has_media = message.other_params, False
    for name, value in params.items():
        if field := _MESSAGE_FIELDS.get(name):
            setattr(message, field, value)
        elif name not in _MESSAGE_KNOWN:
            other[name] = value
        elif name in _MEDIA_URLS:
            has_media = True
    if has_media:
        message.media.extend(
            Media(url=params[url], content_type=params.get(content_type, ""))
            for url, content_type in _MEDIA_KEYS
            if url in params
        )
    if "Latitude" in params and "Longitude" in params:
        location = message.location
        location.latitude = _float(params["Latitude"])
        location.longitude = _float(params["Longitude"])
        location.address = params.get("Address", "")
        location.label = params.get("Label", "")
    return message


def status_received(params: Mapping[str, str], received_at_ns: int) -> StatusReceived:
    """The contract message for a delivery-status callback."""
    _require(params, "MessageSid", "MessageStatus")
    status = StatusReceived()
    status.received_at.FromNanoseconds(received_at_ns)
    if sender := params.get("From"):
        _fill_address(status.sender, sender)
    if recipient := params.get("To"):
        _fill_address(status.recipient, recipient)
    other = status.other_params
    for name, value in params.items():
        if field := _STATUS_FIELDS.get(name):
            setattr(status, field, value)
        elif name not in _STATUS_KNOWN:
            other[name] = value
    return status


class WindowCounter:
    """Counts hits per key in fixed windows of `window_s`; a key is over the limit once it has
    more than `limit` hits in the current window. Memory is bounded by one window's keys."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._window = -1
        self._counts: dict[str, int] = {}

    def _current(self) -> dict[str, int]:
        window = int(self._clock() // self._window_s)
        if window != self._window:
            self._window, self._counts = window, {}
        return self._counts

    def hit(self, key: str) -> bool:
        """Count a hit; True when the key is now over the limit."""
        counts = self._current()
        count = counts.get(key, 0) + 1
        counts[key] = count
        return count > self._limit
