"""The real `python -m services.live_catalog` process: routed messages from JetStream answered
through an outbox (a small recording OutboxService on a real socket), the end-of-live
summaries on live_session's session.closed, the RPCs with their access rules, `migrate`, a
configuration error and a clean SIGTERM stop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from snapsell.common.v1 import address_pb2
from snapsell.gateway.v1 import events_pb2 as gateway_events
from snapsell.live_catalog.v1 import live_catalog_pb2 as pb
from snapsell.live_catalog.v1.live_catalog_pb2_grpc import LiveCatalogServiceStub
from snapsell.live_session.v1 import events_pb2 as session_events
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc
from snapsell.routing.v1 import events_pb2 as routing_events
from snapsell.routing.v1 import routing_pb2

from infra import jetstream
from infra.auth import AuthInterceptor, JwtVerifier
from services.outbox.api import ACCESS_POLICY as OUTBOX_POLICY
from tests.support.polling import eventually
from tests.support.processes import assert_stopped_cleanly, start_service
from tools.dev_keys import DevKeys
from tools.stack import ROOT, RunningService, reset_service_schema, spawn_service

SERVICE = "live_catalog"
SHOP = "+14155238886"
SELLER = "+33600000001"


class RecordingOutbox(outbox_pb2_grpc.OutboxServiceServicer):
    """EnqueueMany, idempotent on (tenant, key) like the real outbox; remembers every request."""

    def __init__(self) -> None:
        self.requests: list[outbox_pb2.EnqueueRequest] = []
        self.keys: dict[tuple[str, str], str] = {}

    async def EnqueueMany(self, request, context):  # type: ignore[no-untyped-def]
        results = []
        for one in request.requests:
            self.requests.append(one)
            key = (one.tenant_id, one.idempotency_key)
            created = key not in self.keys
            message_id = self.keys.setdefault(key, str(uuid.uuid4()))
            results.append(outbox_pb2.EnqueueResult(message_id=message_id, created=created))
        return outbox_pb2.EnqueueManyResponse(results=results)

    def bodies_to(self, value: str) -> list[str]:
        seen: dict[str, str] = {}
        for r in self.requests:
            if r.recipient.value == value:
                seen.setdefault(r.idempotency_key, r.body or r.template.variables["1"])
        return list(seen.values())


@pytest.fixture(scope="module")
async def outbox(token_keys: DevKeys) -> AsyncIterator[tuple[RecordingOutbox, int]]:
    # The outbox's own authentication and access policy: the catalog must call as itself.
    auth = AuthInterceptor(JwtVerifier.from_env(audience="outbox"), OUTBOX_POLICY, service="outbox")
    server = grpc.aio.server(interceptors=[auth])
    recording = RecordingOutbox()
    outbox_pb2_grpc.add_OutboxServiceServicer_to_server(recording, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield recording, port
    await server.stop(0)


@pytest.fixture(scope="module")
async def service(
    admin_dsn: str, nats_url: str, token_keys: DevKeys, outbox: tuple[RecordingOutbox, int]
) -> AsyncIterator[RunningService]:
    await reset_service_schema(admin_dsn, SERVICE)
    running = await start_service(
        SERVICE,
        {
            "DATABASE_URL": admin_dsn,
            "NATS_URL": nats_url,
            "OUTBOX_ADDR": f"127.0.0.1:{outbox[1]}",
            # Its own signing key, to call the outbox as live_catalog.
            **token_keys.env(SERVICE),
        },
    )
    yield running
    assert_stopped_cleanly(running)


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    client = await jetstream.connect(nats_url, name="live-catalog-test")
    yield client.jetstream()
    await client.close()


@pytest.fixture
async def stub(service: RunningService) -> AsyncIterator[LiveCatalogServiceStub]:
    async with grpc.aio.insecure_channel(service.address) as channel:
        yield LiveCatalogServiceStub(channel)


@pytest.fixture
def bearer(make_token: Callable[..., str]) -> Callable[..., tuple[tuple[str, str], ...]]:
    def metadata(role: str, tenant_id: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {make_token(role, tenant_id, 'test', SERVICE)}"),)

    return metadata


def routed(
    body: str, *, tenant: str, session: str, sender: str, seller: bool = False, sid: str = ""
) -> routing_events.MessageRouted:
    received = Timestamp()
    received.FromDatetime(datetime.now(UTC))
    return routing_events.MessageRouted(
        tenant_id=tenant,
        sender_role=routing_pb2.SENDER_ROLE_SELLER if seller else routing_pb2.SENDER_ROLE_CLIENT,
        decision=routing_events.ROUTING_DECISION_LIVE_SIGNAL,
        live_session_id=session,
        message=gateway_events.MessageReceived(
            message_sid=sid or f"SM{uuid.uuid4().hex}",
            account_sid="AC" + "1" * 32,
            sender=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=sender),
            recipient=address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value=SHOP),
            body=body,
            received_at=received,
        ),
    )


async def publish(js: JetStreamContext, message: routing_events.MessageRouted) -> None:
    await jetstream.publish(
        js, "routing.v1.message.routed", message.SerializeToString(), msg_id=str(uuid.uuid4())
    )


async def test_a_live_sale_through_the_process(
    service, js, outbox: tuple[RecordingOutbox, int]
) -> None:
    recording = outbox[0]
    tenant, session = f"shop-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    await publish(
        js, routed("A12 Robe 25€ x2", tenant=tenant, session=session, sender=SELLER, seller=True)
    )
    await eventually(lambda: bool(recording.bodies_to(SELLER)))
    assert recording.bodies_to(SELLER) == ["A12 publié : Robe 25 €, stock 2."]
    seller_reply = next(r for r in recording.requests if r.recipient.value == SELLER)
    assert (seller_reply.sender, seller_reply.tenant_id) == (f"whatsapp:{SHOP}", tenant)

    clients = ["+33611000001", "+33611000002", "+33611000003"]
    for client in clients:
        await publish(js, routed("A12", tenant=tenant, session=session, sender=client))
        await eventually(lambda c=client: bool(recording.bodies_to(c)))
    assert [recording.bodies_to(c) for c in clients] == [
        ["A12 est réservé pour vous (1 x Robe) pendant 30 min."],
        ["A12 est réservé pour vous (1 x Robe) pendant 30 min."],
        ["A12 est épuisé pour le moment : vous êtes n°1 sur la liste d'attente."],
    ]

    # The same message delivered again (a redelivery upstream) claims and answers once.
    again = routed("ANNULER A12", tenant=tenant, session=session, sender=clients[0], sid="SMx1")
    await publish(js, again)
    await publish(js, again)
    await eventually(lambda: len(recording.bodies_to(clients[2])) == 2)
    assert recording.bodies_to(clients[0])[-1] == "Votre réservation de A12 est annulée."
    assert recording.bodies_to(clients[2])[-1] == (
        "A12 est à vous ! Il vous est réservé pendant 30 min."
    )
    assert sum(r.idempotency_key == "live_catalog:reply:SMx1" for r in recording.requests) == 1

    closed_at = Timestamp()
    closed_at.FromDatetime(datetime.now(UTC))
    closed = session_events.LiveSessionClosed(
        tenant_id=tenant, session_id=session, started_at=closed_at, closed_at=closed_at
    )
    for _ in range(2):
        await jetstream.publish(
            js,
            "live_session.v1.session.closed",
            closed.SerializeToString(),
            msg_id=str(uuid.uuid4()),
        )
    await eventually(lambda: len(recording.bodies_to(clients[1])) == 2)
    await eventually(lambda: len(recording.bodies_to(SELLER)) == 2)
    assert recording.bodies_to(clients[1])[-1] == (
        "Récapitulatif du live : A12 Robe (25 €) x1 réservé. Merci !"
    )
    assert recording.bodies_to(SELLER)[-1].startswith("Récapitulatif du live : 1 article(s)")
    await asyncio.sleep(0.5)
    assert len(recording.bodies_to(clients[1])) == 2  # one summary, not two


async def test_rpcs_follow_the_access_rules(service, stub, bearer, js, outbox) -> None:
    tenant, session = f"rpc-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.PostItem(
            pb.PostItemRequest(code="B1", title="Sac", stock=1), metadata=bearer("staff", tenant)
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    with pytest.raises(grpc.aio.AioRpcError) as no_live:
        await stub.PostItem(
            pb.PostItemRequest(code="B1", title="Sac", stock=1), metadata=bearer("owner", tenant)
        )
    assert no_live.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # A seller message opens the catalog's view of the session; then the app posts.
    await publish(js, routed("Bonjour", tenant=tenant, session=session, sender=SELLER, seller=True))
    owner = bearer("owner", tenant)

    async def posted() -> pb.PostItemResponse:
        for _ in range(100):
            try:
                return await stub.PostItem(
                    pb.PostItemRequest(code="b1", title="Sac", price_cents=4000, stock=1),
                    metadata=owner,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("the session never appeared")

    item = (await posted()).item
    assert (item.code, item.stock, item.session_id) == ("B1", 1, session)

    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await stub.PostItem(pb.PostItemRequest(code="B1", title="x", stock=1), metadata=owner)
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS

    staff = bearer("staff", tenant)
    listed = await stub.ListItems(pb.ListItemsRequest(), metadata=staff)
    assert [i.code for i in listed.items] == ["B1"]
    with pytest.raises(grpc.aio.AioRpcError) as other_tenant:
        await stub.GetItem(
            pb.GetItemRequest(tenant_id="someone-else", item_id=item.item_id), metadata=staff
        )
    assert other_tenant.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetItem(pb.GetItemRequest(item_id=str(uuid.uuid4())), metadata=staff)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.GetItem(pb.GetItemRequest(item_id="not-a-uuid"), metadata=staff)
    assert (bad.value.code(), bad.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "item_id must be a UUID",
    )

    await publish(js, routed("B1", tenant=tenant, session=session, sender="+33622000001"))
    await publish(js, routed("B1", tenant=tenant, session=session, sender="+33622000002"))

    async def two_reservations() -> list[pb.Reservation]:
        for _ in range(100):
            page = await stub.ListReservations(
                pb.ListReservationsRequest(session_id=session, page_size=1), metadata=staff
            )
            if page.next_page_token:
                rest = await stub.ListReservations(
                    pb.ListReservationsRequest(
                        session_id=session, page_size=1, page_token=page.next_page_token
                    ),
                    metadata=staff,
                )
                return [*page.reservations, *rest.reservations]
            await asyncio.sleep(0.1)
        raise AssertionError("the claims never arrived")

    held, waiting = sorted(await two_reservations(), key=lambda r: r.status)
    assert (held.status, waiting.status, waiting.waitlist_position) == (
        pb.RESERVATION_STATUS_HELD,
        pb.RESERVATION_STATUS_WAITING,
        1,
    )
    confirmed = await stub.ConfirmReservation(
        pb.ConfirmReservationRequest(reservation_id=held.reservation_id), metadata=owner
    )
    assert confirmed.reservation.status == pb.RESERVATION_STATUS_CONFIRMED
    with pytest.raises(grpc.aio.AioRpcError) as not_held:
        await stub.CancelReservation(
            pb.CancelReservationRequest(reservation_id=held.reservation_id), metadata=owner
        )
    assert not_held.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    summary = await stub.GetSessionSummary(
        pb.GetSessionSummaryRequest(session_id=session), metadata=staff
    )
    assert [(i.code, i.confirmed, i.waiting) for i in summary.summary.items] == [("B1", 1, 1)]
    assert summary.summary.hold_duration.ToTimedelta() == timedelta(minutes=30)


async def test_a_bad_hold_time_stops_the_process_with_one_line(
    admin_dsn, nats_url, token_keys
) -> None:
    env = {"DATABASE_URL": admin_dsn, "NATS_URL": nats_url, "LIVE_CATALOG_HOLD_MINUTES": "0"}
    process = spawn_service(SERVICE, env)
    try:
        returncode = await asyncio.to_thread(process.process.wait, 20)
    finally:
        process.kill()
    assert returncode == 2
    error_lines = [line for line in process.logs().splitlines() if "configuration error" in line]
    assert error_lines == [
        f"{SERVICE}: configuration error: "
        "LIVE_CATALOG_HOLD_MINUTES must be between 1 and 10080, got 0"
    ]


async def test_migrate_subcommand_provisions_and_exits_0(admin_dsn) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", f"services.{SERVICE}", "migrate"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": admin_dsn},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
