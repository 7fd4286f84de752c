"""The one log line per inbound message explains the decision: who sent it, what routing decided
and which live signal it was; an unroutable message names the `To` nobody owns and the fix."""

from __future__ import annotations

import json
import logging

from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events

from infra.log import JsonLineFormatter
from services.routing.consumer import handled_fields
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
        "routing", logging.INFO, __file__, 1, "routing.inbound_handled", (), None
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
