"""`has_nul_text`: a NUL anywhere a request carries text is found, and only there."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message
from snapsell.common.v1 import address_pb2
from snapsell.outbox.v1 import outbox_pb2
from snapsell.routing.v1 import routing_pb2

from infra.grpc_server import has_nul_text


def whatsapp(value: str) -> address_pb2.Address:
    return address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=value)


def template(variables: dict[str, str]) -> outbox_pb2.EnqueueRequest:
    request = outbox_pb2.EnqueueRequest(tenant_id="shop-1")
    request.template.content_sid = "HX" + "0" * 32
    request.template.variables.update(variables)
    return request


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(routing_pb2.CheckOptOutRequest(tenant_id="shop\0"), id="field"),
        pytest.param(routing_pb2.CheckOptOutRequest(address=whatsapp("+336\0")), id="nested"),
        pytest.param(
            routing_pb2.CheckOptOutsRequest(
                checks=[
                    routing_pb2.CheckOptOutRequest(),
                    routing_pb2.CheckOptOutRequest(address=whatsapp("\0")),
                ]
            ),
            id="repeated-message",
        ),
        pytest.param(outbox_pb2.RedriveRequest(message_ids=["a", "b\0"]), id="repeated-text"),
        pytest.param(template({"1": "x\0"}), id="map-value"),
        pytest.param(template({"1\0": "x"}), id="map-key"),
        pytest.param(outbox_pb2.EnqueueRequest(body="\0"), id="oneof"),
    ],
)
def test_a_nul_anywhere_is_found(request_: Message) -> None:
    assert has_nul_text(request_)


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(routing_pb2.CheckOptOutRequest(), id="empty"),
        pytest.param(
            routing_pb2.CheckOptOutsRequest(
                checks=[
                    routing_pb2.CheckOptOutRequest(
                        tenant_id="shop-1", address=address_pb2.Address()
                    )
                ]
            ),
            id="zero-bytes-but-no-nul",  # an empty nested message is serialized with a 0 length
        ),
        pytest.param(template({"1": "Robe", "2": "25 €"}), id="map"),
    ],
)
def test_text_without_nul_passes(request_: Message) -> None:
    assert not has_nul_text(request_)
