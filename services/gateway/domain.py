"""Pure rules of the gateway: Twilio's form parameters to contract messages, and the counters
behind its abuse limits. No I/O here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.common.v1.address_pb2 import Address, Channel
from snapsell.gateway.v1.events_pb2 import Location, Media, MessageReceived, StatusReceived

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


class MissingParameterError(ValueError):
    """A signed webhook lacks a parameter Twilio always sends."""


def parse_address(raw: str) -> Address:
    """`whatsapp:+14155238886` -> (WHATSAPP, "+14155238886"); no prefix means SMS. The value
    is kept as given: a WhatsApp user ID is not a phone number."""
    prefix, sep, rest = raw.partition(":")
    channel = _PREFIXES.get(prefix.lower()) if sep else None
    if channel is None:
        return Address(channel=Channel.CHANNEL_SMS, value=raw.strip())
    return Address(channel=channel, value=rest.strip())


def _require(params: Mapping[str, str], *names: str) -> None:
    missing = [name for name in names if not params.get(name)]
    if missing:
        raise MissingParameterError(f"missing {', '.join(missing)}")


def _timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _float(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


def _media(params: Mapping[str, str]) -> tuple[list[Media], set[str]]:
    media: list[Media] = []
    used: set[str] = set()
    for index in range(MAX_MEDIA):
        url = params.get(f"MediaUrl{index}")
        if url is None:
            continue
        content_type = params.get(f"MediaContentType{index}", "")
        media.append(Media(url=url, content_type=content_type))
        used.update((f"MediaUrl{index}", f"MediaContentType{index}"))
    return media, used


def message_received(params: Mapping[str, str], received_at: datetime) -> MessageReceived:
    """The contract message for an inbound-message webhook."""
    _require(params, "MessageSid", "From", "To")
    message = MessageReceived(
        sender=parse_address(params["From"]),
        recipient=parse_address(params["To"]),
        received_at=_timestamp(received_at),
        **{field: params[name] for name, field in _MESSAGE_FIELDS.items() if name in params},
    )
    media, used = _media(params)
    message.media.extend(media)
    if "Latitude" in params and "Longitude" in params:
        message.location.CopyFrom(
            Location(
                latitude=_float(params["Latitude"]),
                longitude=_float(params["Longitude"]),
                address=params.get("Address", ""),
                label=params.get("Label", ""),
            )
        )
        used |= _LOCATION_FIELDS
    known = used | _MESSAGE_FIELDS.keys() | {"From", "To"}
    message.other_params.update({k: v for k, v in params.items() if k not in known})
    return message


def status_received(params: Mapping[str, str], received_at: datetime) -> StatusReceived:
    """The contract message for a delivery-status callback."""
    _require(params, "MessageSid", "MessageStatus")
    status = StatusReceived(
        received_at=_timestamp(received_at),
        **{field: params[name] for name, field in _STATUS_FIELDS.items() if name in params},
    )
    if params.get("From"):
        status.sender.CopyFrom(parse_address(params["From"]))
    if params.get("To"):
        status.recipient.CopyFrom(parse_address(params["To"]))
    known = _STATUS_FIELDS.keys() | {"From", "To"}
    status.other_params.update({k: v for k, v in params.items() if k not in known})
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

    def over_limit(self, key: str) -> bool:
        return self._current().get(key, 0) >= self._limit
