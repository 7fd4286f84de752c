"""Event timestamps are built without Timestamp.FromDatetime (it is slow) but say the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.outbox.convert import timestamp


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 23, 12, 0, 0, 123_456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 1, 1, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 5, 5, 5, 5, 5, 55),  # naive: UTC, as FromDatetime takes it
    ],
)
def test_timestamp_is_what_from_datetime_gives(moment: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(moment)
    assert timestamp(moment) == expected
