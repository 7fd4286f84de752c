"""What the catalog takes from routing's MessageRouted: its own messages, with the reply
route and the client's address; consent and help decisions are routing's."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.routing.v1 import events_pb2 as routing_events
from snapsell.routing.v1 import routing_pb2

from services.live_catalog.consumer import inbound_of
from services.live_catalog.domain import Channel, Contact, ReplyRoute

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
