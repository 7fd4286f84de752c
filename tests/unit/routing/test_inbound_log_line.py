"""Routing logs one INFO line per batch (how many messages, how each was settled); the line of
each message (DEBUG, built only when DEBUG is on) explains the decision: who sent it, what
routing decided and which live signal it was; an unroutable message gets a WARNING line naming
the `To` nobody owns and the fix."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import pytest
from nats.aio.msg import Msg
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events

from infra.jetstream import Ack
from infra.log import JsonLineFormatter
from services.routing import consumer
from services.routing.consumer import InboundConsumer, handled_fields, inbound_consumer_spec
from services.routing.domain import Decision, DecisionKind, LiveSignalKind, SenderRole
from services.routing.inbound import Routed, RouteOutcome


def _message(to: str = "+14155238886") -> gateway_events.MessageReceived:
    return gateway_events.MessageReceived(
        message_sid="SM" + "0" * 32,
        sender=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value="+33611112222"),
        recipient=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=to),
    )


def _logged(fields: dict[str, object]) -> dict[str, object]:
    record = logging.LogRecord(
        "routing", logging.DEBUG, __file__, 1, "routing.inbound_handled", (), None
    )
    record.fields = fields
    return dict(json.loads(JsonLineFormatter("routing").format(record)))


def test_a_clients_item_code_line_says_client_live_signal_item_code() -> None:
    decision = Decision(DecisionKind.LIVE_SIGNAL, live_signal=LiveSignalKind.ITEM_CODE)
    routed = Routed(RouteOutcome.ROUTED, decision, "chez-marie", sender_role=SenderRole.CLIENT)

    line = _logged(handled_fields(_message(), routed, delivery=1))

    assert line["sender_role"] == "client"
    assert (line["decision"], line["signal"]) == ("live_signal", "item_code")
    assert "hint" not in line


def test_a_sellers_stop_line_says_seller_opt_out_and_the_keyword() -> None:
    decision = Decision(DecisionKind.OPT_OUT, keyword="STOP")
    routed = Routed(RouteOutcome.ROUTED, decision, "chez-marie", sender_role=SenderRole.SELLER)

    line = _logged(handled_fields(_message(), routed, delivery=1))

    assert (line["sender_role"], line["decision"], line["keyword"]) == ("seller", "opt_out", "STOP")
    assert line["signal"] is None


def test_an_unroutable_line_names_the_masked_to_and_how_to_fix_it() -> None:
    line = _logged(handled_fields(_message(), Routed(RouteOutcome.UNROUTABLE), delivery=1))

    assert line["outcome"] == "unroutable"
    assert line["to"] == "whatsapp:+14******86"
    assert line["hint"] == "no channel for whatsapp:+14******86; add one with add-channel"
    assert "+14155238886" not in json.dumps(line)


_CLIENT_CODE = Routed(
    RouteOutcome.ROUTED,
    Decision(DecisionKind.LIVE_SIGNAL, live_signal=LiveSignalKind.ITEM_CODE),
    "chez-marie",
    sender_role=SenderRole.CLIENT,
)


class _Router:
    def __init__(self, outcomes: Sequence[Routed]) -> None:
        self._outcomes = outcomes

    async def route_batch(self, deliveries: list[object]) -> list[Routed]:
        assert len(deliveries) == len(self._outcomes)
        return list(self._outcomes)


def _batch_consumer(outcomes: Sequence[Routed]) -> InboundConsumer:
    spec = inbound_consumer_spec(ack_wait_s=30, max_deliver=20, max_ack_pending=100)
    return InboundConsumer(_Router(outcomes), None, spec, retry_delay_cap_s=30)  # type: ignore[arg-type]


def _deliveries(count: int) -> list[Msg]:
    return [
        Msg(
            _client=None,
            subject="gateway.v1.message.received",
            reply=f"$JS.ACK.INBOUND.routing.1.{n}.{n}.1700000000000000000.0",
            data=_message().SerializeToString(),
        )
        for n in range(1, count + 1)
    ]


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(record.__dict__["fields"])


def _events(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def test_a_batch_of_messages_logs_one_info_line_with_its_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=consumer.__name__)
    outcomes = [_CLIENT_CODE] * 7 + [Routed(RouteOutcome.DUPLICATE)]

    decisions = await _batch_consumer(outcomes).handle_batch(_deliveries(8))

    assert all(isinstance(decision, Ack) for decision in decisions)
    assert _events(caplog, logging.INFO) == ["routing.batch_handled"]
    [line] = [r for r in caplog.records if r.levelno == logging.INFO]
    fields = _fields(line)
    assert (fields["messages"], fields["outcomes"]) == (8, {"routed": 7, "duplicate": 1})
    assert fields["duration_ms"] >= 0
    assert not [r for r in caplog.records if r.levelno != logging.INFO]


async def test_the_lines_of_each_message_are_not_even_built_below_debug(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger=consumer.__name__)

    def refuse(*_args: object) -> dict[str, object]:
        raise AssertionError("a message's log fields were built at INFO")

    monkeypatch.setattr(consumer, "handled_fields", refuse)

    await _batch_consumer([_CLIENT_CODE] * 3).handle_batch(_deliveries(3))

    assert _events(caplog, logging.INFO) == ["routing.batch_handled"]


async def test_at_debug_each_message_has_its_line_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=consumer.__name__)

    await _batch_consumer([_CLIENT_CODE] * 3).handle_batch(_deliveries(3))

    assert _events(caplog, logging.DEBUG) == ["routing.inbound_handled"] * 3
    assert _events(caplog, logging.INFO) == ["routing.batch_handled"]
    decisions = [_fields(r)["decision"] for r in caplog.records if r.levelno == logging.DEBUG]
    assert decisions == ["live_signal"] * 3


async def test_an_unroutable_message_still_gets_its_own_line_with_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=consumer.__name__)

    await _batch_consumer([_CLIENT_CODE, Routed(RouteOutcome.UNROUTABLE)]).handle_batch(
        _deliveries(2)
    )

    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == "routing.inbound_unroutable"
    assert (
        _fields(warning)["hint"] == "no channel for whatsapp:+14******86; add one with add-channel"
    )
    [batch] = [r for r in caplog.records if r.levelno == logging.INFO]
    assert _fields(batch)["outcomes"] == {"routed": 1, "unroutable": 1}
