"""Which failures the inbound consumer retries quietly, and which it reports as a bug."""

from __future__ import annotations

import logging

import asyncpg
import pytest
from nats.aio.msg import Msg
from snapsell.gateway.v1.events_pb2 import MessageReceived

from infra.jetstream import Nak
from services.routing.consumer import InboundConsumer, inbound_consumer_spec


class _FailingRouter:
    def __init__(self, error: Exception) -> None:
        self._error = error

    async def route_batch(self, deliveries: list[object]) -> list[Exception]:
        return [self._error for _ in deliveries]


def _delivery(number: int) -> Msg:
    body = MessageReceived(message_sid="SM" + "a" * 32).SerializeToString()
    reply = f"$JS.ACK.INBOUND.routing.{number}.7.7.1700000000000000000.0"
    return Msg(_client=None, subject="gateway.v1.message.received", reply=reply, data=body)


def _consumer(error: Exception) -> InboundConsumer:
    spec = inbound_consumer_spec(ack_wait_s=30, max_deliver=20, max_ack_pending=100)
    return InboundConsumer(_FailingRouter(error), None, spec, retry_delay_cap_s=30)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [
        # What asyncpg raises on a connection the server cut in the middle of an operation.
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        ConnectionResetError(),
    ],
)
async def test_a_lost_database_link_is_retried_without_an_error_log(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    [decision] = await _consumer(error).handle_batch([_delivery(1)])
    assert isinstance(decision, Nak)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_unexpected_failure_is_retried_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    [decision] = await _consumer(KeyError("bug")).handle_batch([_delivery(1)])
    assert isinstance(decision, Nak)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
