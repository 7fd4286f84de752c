"""The live_session contract's messages built from domain values: the events this service
records (`live_session.v1.session.created` / `.closed`) and the API's `LiveSession`."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from snapsell.live_session.v1 import events_pb2, live_session_pb2

from infra.convert import timestamp
from services.live_session.domain import (
    CloseReason,
    LiveSession,
    SessionStatus,
    SignalKind,
)

SESSION_CREATED_SUBJECT = "live_session.v1.session.created"
SESSION_CLOSED_SUBJECT = "live_session.v1.session.closed"

STATUS_TO_PROTO = {
    SessionStatus.ACTIVE: live_session_pb2.SESSION_STATUS_ACTIVE,
    SessionStatus.CLOSED: live_session_pb2.SESSION_STATUS_CLOSED,
}
STATUS_FROM_PROTO = {value: key for key, value in STATUS_TO_PROTO.items()}
CLOSE_REASON_TO_PROTO = {
    CloseReason.IDLE: live_session_pb2.CLOSE_REASON_IDLE,
    CloseReason.MANUAL: live_session_pb2.CLOSE_REASON_MANUAL,
}
SIGNAL_KIND_TO_PROTO = {
    SignalKind.SELLER_MESSAGE: live_session_pb2.SIGNAL_KIND_SELLER_MESSAGE,
    SignalKind.CLIENT_ITEM_CODE: live_session_pb2.SIGNAL_KIND_CLIENT_ITEM_CODE,
}
SIGNAL_KIND_FROM_PROTO = {value: key for key, value in SIGNAL_KIND_TO_PROTO.items()}


def session_message(session: LiveSession) -> live_session_pb2.LiveSession:
    message = live_session_pb2.LiveSession(
        session_id=str(session.id),
        tenant_id=session.tenant_id,
        status=STATUS_TO_PROTO[session.status],
        started_at=timestamp(session.started_at),
        last_activity_at=timestamp(session.last_activity_at),
    )
    if session.closed_at is not None:
        message.closed_at.CopyFrom(timestamp(session.closed_at))
    if session.close_reason is not None:
        message.close_reason = CLOSE_REASON_TO_PROTO[session.close_reason]
    return message


def session_created(
    session: LiveSession, signal_kind: SignalKind, correlation_id: str
) -> events_pb2.LiveSessionCreated:
    return events_pb2.LiveSessionCreated(
        tenant_id=session.tenant_id,
        session_id=str(session.id),
        signal_kind=SIGNAL_KIND_TO_PROTO[signal_kind],
        correlation_id=correlation_id,
        started_at=timestamp(session.started_at),
    )


def session_closed(session: LiveSession, correlation_id: str) -> events_pb2.LiveSessionClosed:
    if session.closed_at is None or session.close_reason is None or session.duration is None:
        raise ValueError(f"session {session.id} is not closed")
    duration = Duration()
    duration.FromTimedelta(session.duration)
    return events_pb2.LiveSessionClosed(
        tenant_id=session.tenant_id,
        session_id=str(session.id),
        reason=CLOSE_REASON_TO_PROTO[session.close_reason],
        duration=duration,
        correlation_id=correlation_id,
        started_at=timestamp(session.started_at),
        last_activity_at=timestamp(session.last_activity_at),
        closed_at=timestamp(session.closed_at),
    )
