"""The contract messages built from domain values: events and the API's LiveSession."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from snapsell.live_session.v1 import live_session_pb2 as pb

from services.live_session import events
from services.live_session.domain import CloseReason, LiveSession, SessionStatus, SignalKind

NOON = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def closed_session(reason: CloseReason) -> LiveSession:
    return LiveSession(
        uuid.uuid4(),
        "shop-1",
        SessionStatus.CLOSED,
        NOON,
        NOON + timedelta(minutes=10),
        NOON + timedelta(minutes=55),
        reason,
    )


def test_every_domain_enum_value_has_a_contract_value() -> None:
    assert set(events.STATUS_TO_PROTO) == set(SessionStatus)
    assert set(events.CLOSE_REASON_TO_PROTO) == set(CloseReason)
    assert set(events.SIGNAL_KIND_TO_PROTO) == set(SignalKind)
    for mapping in (events.STATUS_TO_PROTO, events.CLOSE_REASON_TO_PROTO):
        assert 0 not in mapping.values()  # _UNSPECIFIED never stands for a real value


def test_closed_event_carries_tenant_session_reason_duration_and_correlation() -> None:
    session = closed_session(CloseReason.IDLE)
    event = events.session_closed(session, "SM9")
    assert event.tenant_id == "shop-1" and event.session_id == str(session.id)
    assert event.reason == pb.CLOSE_REASON_IDLE
    assert event.duration.ToTimedelta() == timedelta(minutes=55)
    assert event.correlation_id == "SM9"
    assert event.closed_at.ToDatetime(UTC) == NOON + timedelta(minutes=55)


def test_closed_event_of_an_active_session_is_a_bug() -> None:
    active = LiveSession(uuid.uuid4(), "shop-1", SessionStatus.ACTIVE, NOON, NOON)
    with pytest.raises(ValueError, match="not closed"):
        events.session_closed(active, "")


def test_created_event() -> None:
    session = LiveSession(uuid.uuid4(), "shop-1", SessionStatus.ACTIVE, NOON, NOON)
    event = events.session_created(session, SignalKind.CLIENT_ITEM_CODE, "SM1")
    assert event.signal_kind == pb.SIGNAL_KIND_CLIENT_ITEM_CODE
    assert event.started_at.ToDatetime(UTC) == NOON
    assert (event.tenant_id, event.correlation_id) == ("shop-1", "SM1")


def test_session_message_leaves_closing_fields_unset_while_active() -> None:
    active = LiveSession(uuid.uuid4(), "shop-1", SessionStatus.ACTIVE, NOON, NOON)
    message = events.session_message(active)
    assert message.status == pb.SESSION_STATUS_ACTIVE
    assert not message.HasField("closed_at")
    assert message.close_reason == pb.CLOSE_REASON_UNSPECIFIED
    closed = events.session_message(closed_session(CloseReason.MANUAL))
    assert closed.close_reason == pb.CLOSE_REASON_MANUAL and closed.HasField("closed_at")


def test_subjects_follow_the_context_entity_past_tense_convention() -> None:
    assert events.SESSION_CREATED_SUBJECT == "live_session.v1.session.created"
    assert events.SESSION_CLOSED_SUBJECT == "live_session.v1.session.closed"
