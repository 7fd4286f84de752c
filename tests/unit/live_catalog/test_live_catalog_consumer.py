"""What the catalog takes from routing's MessageRouted: its own messages, with the reply
route and the client's address; consent and help decisions are routing's. The messages handled
together make one batch and one INFO log line, each message's line being DEBUG."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.msg import Msg
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.routing.v1 import events_pb2 as routing_events
from snapsell.routing.v1 import routing_pb2

from infra.jetstream import Ack
from services.live_catalog import consumer
from services.live_catalog.consumer import RoutedConsumer, inbound_of, routed_consumer_spec
from services.live_catalog.domain import Channel, Contact, Inbound, ReplyRoute

SESSION = str(uuid.uuid4())
AT = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)


def routed(**changes: object) -> routing_events.MessageRouted:
    received = Timestamp()
    received.FromDatetime(AT)
    message = routing_events.MessageRouted(
        tenant_id="shop",
        sender_role=routing_pb2.SENDER_ROLE_CLIENT,
        decision=routing_events.ROUTING_DECISION_LIVE_SIGNAL,
        live_session_id=SESSION,
        message=gateway_events.MessageReceived(
            message_sid="SM1",
            account_sid="AC1",
            sender=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value="+336"),
            recipient=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value="+141"),
            body="A12",
            received_at=received,
        ),
    )
    for name, value in changes.items():
        if name == "messaging_service_sid":
            message.message.messaging_service_sid = str(value)
        else:
            setattr(message, name, value)
    return message


def test_a_client_live_signal_becomes_an_inbound_with_its_reply_route() -> None:
    inbound = inbound_of(routed())
    assert inbound is not None
    assert (inbound.message_sid, inbound.tenant_id, inbound.from_seller) == ("SM1", "shop", False)
    assert inbound.session_id == uuid.UUID(SESSION)
    assert inbound.received_at == AT
    assert inbound.contact == Contact(Channel.WHATSAPP, "+336")
    assert inbound.route == ReplyRoute("whatsapp:+141", "AC1")


def test_a_messaging_service_answers_for_itself() -> None:
    inbound = inbound_of(routed(messaging_service_sid="MG1"))
    assert inbound is not None and inbound.route.sender == "MG1"


def test_conversation_without_a_session_is_taken_with_no_session() -> None:
    inbound = inbound_of(
        routed(decision=routing_events.ROUTING_DECISION_CONVERSATION, live_session_id="")
    )
    assert inbound is not None and inbound.session_id is None


@pytest.mark.parametrize(
    "changes",
    [
        {"decision": routing_events.ROUTING_DECISION_OPT_OUT},
        {"decision": routing_events.ROUTING_DECISION_HELP},
        {"sender_role": routing_pb2.SENDER_ROLE_UNSPECIFIED},
        {"tenant_id": ""},
        {"live_session_id": "not-a-uuid"},
    ],
)
def test_what_is_not_the_catalogs_is_left_alone(changes: dict[str, object]) -> None:
    assert inbound_of(routed(**changes)) is None


class _Store:
    """Answers each batch with the outcome given for each MessageSid."""

    def __init__(self, outcomes: dict[str, str]) -> None:
        self.outcomes = outcomes
        self.batches: list[list[str]] = []

    async def handle_batch(self, inbounds: Sequence[Inbound]) -> list[str | Exception]:
        self.batches.append([inbound.message_sid for inbound in inbounds])
        return [self.outcomes[inbound.message_sid] for inbound in inbounds]


def _delivery(number: int) -> Msg:
    message = routed()
    message.message.message_sid = f"SM{number}"
    reply = f"$JS.ACK.ROUTING_EVENTS.live-catalog.1.{number}.{number}.1700000000000000000.0"
    return Msg(
        _client=None,
        subject="routing.v1.message.routed",
        reply=reply,
        data=message.SerializeToString(),
    )


async def _handle_together(store: _Store, count: int) -> list[object]:
    spec = routed_consumer_spec(ack_wait_s=30, max_deliver=5, max_ack_pending=100)
    handler = RoutedConsumer(store, spec, on_commit=lambda: None)  # type: ignore[arg-type]
    return list(await asyncio.gather(*(handler.handle(_delivery(n)) for n in range(count))))


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == level]


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(record.__dict__["fields"])


async def test_a_batch_of_messages_logs_one_info_line_with_its_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=consumer.__name__)
    store = _Store({f"SM{n}": "claim_held" if n < 5 else "duplicate" for n in range(6)})

    decisions = await _handle_together(store, 6)

    assert all(isinstance(decision, Ack) for decision in decisions)
    assert len(store.batches) == 1 and len(store.batches[0]) == 6
    [line] = _lines(caplog, logging.INFO)
    assert line.getMessage() == "live_catalog.batch_handled"
    fields = _fields(line)
    assert (fields["messages"], fields["outcomes"]) == (6, {"claim_held": 5, "duplicate": 1})
    assert fields["duration_ms"] >= 0
    assert len(caplog.records) == 1


async def test_at_debug_each_message_of_the_batch_has_its_line_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=consumer.__name__)

    await _handle_together(_Store({f"SM{n}": "claim_held" for n in range(3)}), 3)

    debug = _lines(caplog, logging.DEBUG)
    assert [r.getMessage() for r in debug] == ["live_catalog.inbound_handled"] * 3
    assert sorted(_fields(r)["message_sid"] for r in debug) == ["SM0", "SM1", "SM2"]
    assert [r.getMessage() for r in _lines(caplog, logging.INFO)] == ["live_catalog.batch_handled"]
