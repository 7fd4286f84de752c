"""The JetStream consumer of Twilio status callbacks (`StatusReceived`, published by the
gateway): each is decoded and handed to `status_callbacks.StatusCallbacks`, and what that did
decides the ack. Duplicates and out-of-order callbacks are acked and change nothing.

A callback can overtake the write of its own send's result (Twilio calls back within
milliseconds): an unknown SID is retried with a short delay a few times (about 8 s in all),
then terminated, logged and counted — a forged or stray SID costs a handful of deliveries, not
the consumer's 60. A callback naming another account than the message's is terminated at once.
The database being away (a restart, a cut connection) is retried with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from nats.aio.msg import Msg
from prometheus_client import Counter
from snapsell.gateway.v1.events_pb2 import StatusReceived

from infra.db import DATABASE_UNAVAILABLE
from infra.jetstream import Ack, ConsumerSpec, Decision, Nak, Term, decode, failure_delay
from infra.log import get_logger
from infra.streams import INBOUND_STATUS_SUBJECT
from services.outbox.status_callbacks import CallbackEffect

STATUS_CONSUMER = ConsumerSpec(
    stream="INBOUND",
    durable="outbox-status-callbacks",
    filter_subject=INBOUND_STATUS_SUBJECT,
    ack_wait_s=30.0,
    # For the database being away; an unknown SID gives up after UNKNOWN_SID_DELIVERIES.
    max_deliver=60,
)
# With the growing delays of `unknown_sid_delay_s` (0.25, 0.5, 1, 2, 4 s): about 8 s for a
# send's result to be recorded before its callback is given up on.
UNKNOWN_SID_DELIVERIES = 6

CALLBACKS = Counter(
    "snapsell_outbox_status_callbacks_total",
    "Twilio status callbacks consumed, by effect",
    ["effect"],
)
_log = get_logger(__name__)


def unknown_sid_delay_s(num_delivered: int) -> float:
    """Short at first (the usual race lasts milliseconds), then every 5 s."""
    return min(5.0, 0.25 * 2.0 ** max(0, num_delivered - 1))


def _error_code(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


class StatusLedger(Protocol):
    """Where callbacks are applied (see status_callbacks.StatusCallbacks)."""

    async def apply(
        self,
        twilio_sid: str,
        twilio_status: str,
        *,
        account_sid: str,
        error_code: int | None,
        error_message: str | None,
        now: datetime,
    ) -> CallbackEffect: ...


class StatusCallbackHandler:
    def __init__(self, callbacks: StatusLedger, now: Callable[[], datetime]) -> None:
        self._callbacks = callbacks
        self._now = now

    async def __call__(self, msg: Msg) -> Decision:
        callback = decode(StatusReceived, msg.data)
        if not callback.message_sid or not callback.message_status:
            CALLBACKS.labels("incomplete").inc()
            return Term("StatusReceived without message_sid or message_status")
        try:
            effect = await self._callbacks.apply(
                callback.message_sid,
                callback.message_status,
                account_sid=callback.account_sid,
                error_code=_error_code(callback.error_code),
                error_message=callback.error_message or None,
                now=self._now(),
            )
        except DATABASE_UNAVAILABLE as error:
            delay = failure_delay(msg.metadata.num_delivered)
            _log.warning(
                "outbox.callback_retry",
                extra={
                    "fields": {"error": str(error) or type(error).__name__, "retry_in_s": delay}
                },
            )
            return Nak(delay)
        if effect is CallbackEffect.UNKNOWN_SID:
            if msg.metadata.num_delivered >= UNKNOWN_SID_DELIVERIES:
                return self._refuse(callback, effect, "no outbox message has this SID")
            return Nak(unknown_sid_delay_s(msg.metadata.num_delivered))
        if effect is CallbackEffect.WRONG_ACCOUNT:
            return self._refuse(callback, effect, "the message was sent with another account")
        CALLBACKS.labels(effect.value).inc()
        return Ack()

    @staticmethod
    def _refuse(callback: StatusReceived, effect: CallbackEffect, reason: str) -> Term:
        CALLBACKS.labels(effect.value).inc()
        _log.warning(
            f"outbox.callback_{effect.value}",
            extra={
                "fields": {
                    "message_sid": callback.message_sid,
                    "account_sid": callback.account_sid,
                    "status": callback.message_status,
                }
            },
        )
        return Term(reason)
