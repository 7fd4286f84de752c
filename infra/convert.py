"""The proto ↔ domain conversions several services share: the channel of an address and
timestamps. A service's own enums and messages are converted in the service (its convert.py or
events.py); this module holds what would otherwise be copied into each.

    CHANNEL_TO_PROTO, CHANNEL_FROM_PROTO = channel_maps(Channel)   # Channel: the service's StrEnum
    KIND_TO_PROTO, KIND_FROM_PROTO = enum_maps(Kind, proto_numbers(pb2.Kind, "KIND_"))
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TypeAlias, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.common.v1 import address_pb2

E = TypeVar("E", bound=enum.StrEnum)
N = TypeVar("N", bound=int)
ProtoChannel: TypeAlias = address_pb2.Channel.ValueType

# `snapsell.common.v1.Channel` by the value every service's domain spells it with.
CHANNELS: Mapping[str, ProtoChannel] = {
    "sms": address_pb2.CHANNEL_SMS,
    "whatsapp": address_pb2.CHANNEL_WHATSAPP,
    "messenger": address_pb2.CHANNEL_MESSENGER,
}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def enum_maps(domain: type[E], numbers: Mapping[str, N]) -> tuple[dict[E, N], dict[N, E]]:
    """`domain` to proto enum numbers and back, from `numbers` keyed by member value; every
    member must have a number (a new member without one fails at import, not in a request)."""
    missing = sorted(member.value for member in domain if member.value not in numbers)
    if missing:
        raise ValueError(f"no proto value for {domain.__name__} {missing}")
    to_proto = {member: numbers[member.value] for member in domain}
    return to_proto, {number: member for member, number in to_proto.items()}


def proto_numbers(values: Iterable[tuple[str, N]], prefix: str) -> dict[str, N]:
    """A proto enum's numbers keyed as a domain enum spells its values: `MESSAGE_KIND_COMPLIANCE`
    under "compliance" for the prefix `MESSAGE_KIND_` (`values`: the enum wrapper's `items()`;
    `<prefix>UNSPECIFIED` is left out)."""
    return {
        name.removeprefix(prefix).lower(): number
        for name, number in values
        if name.startswith(prefix) and name != f"{prefix}UNSPECIFIED"
    }


def channel_maps(domain: type[E]) -> tuple[dict[E, ProtoChannel], dict[ProtoChannel, E]]:
    """A service's channel enum to `snapsell.common.v1.Channel` and back
    (CHANNEL_UNSPECIFIED maps to nothing)."""
    return enum_maps(domain, CHANNELS)


def timestamp(moment: datetime) -> Timestamp:
    """A protobuf Timestamp; a naive datetime is taken as UTC (as `Timestamp.FromDatetime`).

    Integer arithmetic: `FromDatetime` goes through time tuples, a visible cost on paths that
    answer several timestamps per call (a list page, a Touch, every event of every send)."""
    return Timestamp(**timestamp_fields(moment))


def timestamp_fields(moment: datetime) -> dict[str, int]:
    """`timestamp(moment)` as constructor fields: a nested message given as a dict is built in
    place instead of being built apart and copied in."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return {"seconds": delta.days * 86_400 + delta.seconds, "nanos": delta.microseconds * 1000}
