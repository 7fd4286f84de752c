"""A claimed message for the outbox's unit tests, with only what a test cares about changed."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from services.outbox.domain import Channel, ClaimedMessage, MessageKind

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def claimed(**changes: object) -> ClaimedMessage:
    message = ClaimedMessage(
        id=uuid.uuid4(),
        tenant_id="shop-a",
        correlation_id="SMinbound",
        kind=MessageKind.CONVERSATIONAL,
        account_sid="AC" + "1" * 32,
        sender="+14155550100",
        channel=Channel.SMS,
        recipient="+33611111111",
        body="hello",
        content_sid=None,
        content_variables=None,
        attempt_count=0,
        max_attempts=3,
        reconcile_failures=0,
        budget_started_at=NOW - timedelta(seconds=5),
        claimed_at=NOW - timedelta(seconds=1),
        reconcile_since=None,
        traceparent=None,
        lease_expired=False,
    )
    return replace(message, **changes)  # type: ignore[arg-type]
