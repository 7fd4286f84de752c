"""The shared proto conversions: the fast timestamp agrees with protobuf's own, every channel
of every service maps both ways."""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st
from snapsell.common.v1 import address_pb2
from snapsell.outbox.v1 import outbox_pb2

from infra.convert import CHANNELS, channel_maps, enum_maps, proto_numbers, timestamp
from services.live_catalog.domain import Channel as LiveCatalogChannel
from services.outbox.domain import Channel as OutboxChannel
from services.routing.domain import Channel as RoutingChannel


@given(
    st.datetimes(
        min_value=datetime(1900, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.sampled_from(
            [None, UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=30))]
        ),
    )
)
def test_timestamp_matches_protobuf_from_datetime(moment: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(moment)
    assert timestamp(moment) == expected


@pytest.mark.parametrize(
    "moment",
    [
        datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2026, 3, 1, 12, 0, 0, 999_999, tzinfo=UTC),
    ],
)
def test_timestamp_edges(moment: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(moment)
    assert timestamp(moment) == expected


@pytest.mark.parametrize("domain", [RoutingChannel, LiveCatalogChannel, OutboxChannel])
def test_every_channel_of_every_service_maps_both_ways(domain: type[enum.StrEnum]) -> None:
    to_proto, from_proto = channel_maps(domain)
    assert set(to_proto) == set(domain)
    assert {from_proto[to_proto[member]] for member in domain} == set(domain)
    assert set(to_proto.values()) == set(CHANNELS.values())
    assert address_pb2.CHANNEL_UNSPECIFIED not in from_proto


def test_a_member_without_a_proto_value_fails_at_once() -> None:
    class Colour(enum.StrEnum):
        RED = "red"
        BLUE = "blue"

    with pytest.raises(ValueError, match=r"Colour \['blue'\]"):
        enum_maps(Colour, {"red": 1})


def test_proto_numbers_key_a_proto_enum_by_domain_value() -> None:
    numbers = proto_numbers(outbox_pb2.MessageKind.items(), "MESSAGE_KIND_")
    assert numbers == {
        "conversational": outbox_pb2.MESSAGE_KIND_CONVERSATIONAL,
        "compliance": outbox_pb2.MESSAGE_KIND_COMPLIANCE,
    }
