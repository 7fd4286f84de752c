"""The status-callback handler's decisions: decode, apply, and what to do with a callback
that overtakes the write of its own send."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import pytest
from snapsell.gateway.v1.events_pb2 import StatusReceived

from infra.jetstream import Ack, Nak, RejectedEventError, Term
from services.outbox.consumer import (
    STATUS_CONSUMER,
    UNKNOWN_SID_DELIVERIES,
    StatusCallbackHandler,
)
from services.outbox.status_callbacks import CallbackEffect

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@dataclass
class FakeMetadata:
    num_delivered: int = 1


@dataclass
class FakeMsg:
    data: bytes
    subject: str = "gateway.v1.status.received"
    metadata: FakeMetadata = field(default_factory=FakeMetadata)


class FakeCallbacks:
    def __init__(self, effect: CallbackEffect, failure: Exception | None = None) -> None:
        self.effect = effect
        self.failure = failure
        self.applied: list[tuple[str, str, int | None]] = []

    async def apply(
        self,
        twilio_sid: str,
        twilio_status: str,
        *,
        account_sid: str,
        error_code: int | None,
        error_message: str | None,
        now: datetime,
    ) -> CallbackEffect:
        if self.failure is not None:
            raise self.failure
        self.applied.append((twilio_sid, twilio_status, error_code))
        return self.effect


def callback(status: str, error_code: str = "") -> bytes:
    event = StatusReceived(message_sid="SM1", message_status=status, error_code=error_code)
    return event.SerializeToString()


async def test_a_callback_is_applied_and_acked() -> None:
    callbacks = FakeCallbacks(CallbackEffect.ADVANCED)
    handler = StatusCallbackHandler(callbacks, lambda: NOW)
    assert await handler(FakeMsg(callback("undelivered", "30008"))) == Ack()  # type: ignore[arg-type]
    assert callbacks.applied == [("SM1", "undelivered", 30008)]


async def test_a_duplicate_or_late_callback_is_acked_without_effect() -> None:
    handler = StatusCallbackHandler(FakeCallbacks(CallbackEffect.IGNORED), lambda: NOW)
    assert await handler(FakeMsg(callback("delivered"))) == Ack()  # type: ignore[arg-type]


async def test_a_callback_ahead_of_its_send_result_is_retried_then_given_up() -> None:
    handler = StatusCallbackHandler(FakeCallbacks(CallbackEffect.UNKNOWN_SID), lambda: NOW)
    first = await handler(FakeMsg(callback("sent")))  # type: ignore[arg-type]
    assert isinstance(first, Nak) and first.delay_s < 1
    before_last = FakeMsg(callback("sent"), metadata=FakeMetadata(UNKNOWN_SID_DELIVERIES - 1))
    assert isinstance(await handler(before_last), Nak)  # type: ignore[arg-type]
    last = FakeMsg(callback("sent"), metadata=FakeMetadata(UNKNOWN_SID_DELIVERIES))
    assert isinstance(await handler(last), Term)  # type: ignore[arg-type]
    assert UNKNOWN_SID_DELIVERIES < STATUS_CONSUMER.max_deliver


async def test_a_callback_from_another_account_is_terminated() -> None:
    handler = StatusCallbackHandler(FakeCallbacks(CallbackEffect.WRONG_ACCOUNT), lambda: NOW)
    assert isinstance(await handler(FakeMsg(callback("delivered"))), Term)  # type: ignore[arg-type]


async def test_an_undecodable_callback_is_rejected_for_the_loop_to_terminate() -> None:
    handler = StatusCallbackHandler(FakeCallbacks(CallbackEffect.ADVANCED), lambda: NOW)
    with pytest.raises(RejectedEventError):
        await handler(FakeMsg(b"\xff\xff not protobuf"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionRefusedError(111, "Connection refused"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
    ],
)
async def test_a_callback_is_retried_while_the_database_is_away(failure: Exception) -> None:
    handler = StatusCallbackHandler(FakeCallbacks(CallbackEffect.ADVANCED, failure), lambda: NOW)
    decision = await handler(FakeMsg(callback("delivered"), metadata=FakeMetadata(3)))  # type: ignore[arg-type]
    assert decision == Nak(2.0)
