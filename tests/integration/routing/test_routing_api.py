"""RoutingService over a real gRPC socket with the production auth interceptor and PostgreSQL:
CheckOptOut, CheckOptOuts, ListOptOuts, SetConsent, their access rules and their errors."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import grpc
import pytest
from snapsell.common.v1 import address_pb2
from snapsell.routing.v1 import events_pb2, routing_pb2, routing_pb2_grpc

from services.routing.api import ACCESS_POLICY, MAX_CHECKS, SERVICE_FULL_NAME
from tests.integration.routing.conftest import CHANNEL_SCOPED_TENANT
from tests.integration.routing.fakes import whatsapp

Bearer = Callable[..., tuple[tuple[str, str], ...]]
OPTED_OUT = routing_pb2.CONSENT_STATE_OPTED_OUT
OPTED_IN = routing_pb2.CONSENT_STATE_OPTED_IN


async def set_consent(
    stub: routing_pb2_grpc.RoutingServiceStub,
    bearer: Bearer,
    value: str,
    state: int = OPTED_OUT,
    *,
    role: str = "owner",
    tenant: str = "shop-1",
) -> routing_pb2.SetConsentResponse:
    return await stub.SetConsent(
        routing_pb2.SetConsentRequest(address=whatsapp(value), state=state, reason="by phone"),
        metadata=bearer(role, tenant, sub="outbox" if role == "service" else "alice"),
    )


async def check(
    stub: routing_pb2_grpc.RoutingServiceStub, bearer: Bearer, value: str, tenant: str = "shop-1"
) -> routing_pb2.CheckOptOutResponse:
    return await stub.CheckOptOut(
        routing_pb2.CheckOptOutRequest(tenant_id=tenant, address=whatsapp(value)),
        metadata=bearer("service", sub="outbox"),
    )


def test_every_rpc_of_the_proto_has_an_access_policy() -> None:
    methods = routing_pb2.DESCRIPTOR.services_by_name["RoutingService"].methods
    assert {f"/{SERVICE_FULL_NAME}/{m.name}" for m in methods} == set(ACCESS_POLICY)


async def test_set_consent_opts_out_and_check_sees_it(stub, bearer: Bearer) -> None:
    reply = await set_consent(stub, bearer, "+33 6 11 11 11 11")
    assert reply.changed and reply.opted_out
    status = await check(stub, bearer, "+33611111111")
    assert status.opted_out
    assert status.opted_out_at.ToDatetime() == reply.opted_out_at.ToDatetime()
    assert not status.HasField("last_inbound_at")


async def test_set_consent_is_audited_with_the_operator(
    stub, bearer: Bearer, clean: asyncpg.Pool
) -> None:
    await set_consent(stub, bearer, "+33611111111")
    again = await set_consent(stub, bearer, "+33611111111")
    assert not again.changed and again.opted_out
    await set_consent(stub, bearer, "+33611111111", OPTED_IN)
    rows = await clean.fetch("SELECT subject, payload FROM events ORDER BY id")
    assert [row["subject"] for row in rows] == [
        "routing.v1.opt_out.recorded",
        "routing.v1.opt_out.removed",
    ]
    event = events_pb2.OptOutChanged.FromString(rows[0]["payload"])
    assert event.actor == "alice" and event.reason == "by phone"
    assert event.source == routing_pb2.CONSENT_SOURCE_OPERATOR
    assert not (await check(stub, bearer, "+33611111111")).opted_out


async def test_check_of_an_unknown_address_is_not_opted_out(stub, bearer: Bearer) -> None:
    reply = await check(stub, bearer, "+33699999999")
    assert not reply.opted_out and not reply.HasField("opted_out_at")


def checks(*pairs: tuple[str, address_pb2.Address]) -> routing_pb2.CheckOptOutsRequest:
    return routing_pb2.CheckOptOutsRequest(
        checks=[routing_pb2.CheckOptOutRequest(tenant_id=t, address=a) for t, a in pairs]
    )


async def test_batch_check_answers_every_address_in_the_order_asked(stub, bearer: Bearer) -> None:
    await set_consent(stub, bearer, "+33611111111")
    await set_consent(stub, bearer, "+33622222222", tenant="shop-2")
    asked = [
        ("shop-1", whatsapp("+33622222222")),
        ("shop-1", whatsapp("+33 6 11 11 11 11")),  # normalised like CheckOptOut
        ("shop-2", whatsapp("+33622222222")),
        ("shop-2", whatsapp("+33611111111")),
        ("shop-1", messenger("+33611111111")),
        ("shop-1", whatsapp("+33611111111")),
    ]
    reply = await stub.CheckOptOuts(checks(*asked), metadata=bearer("service", sub="outbox"))
    assert [r.opted_out for r in reply.results] == [False, True, True, False, False, True]
    single = await check(stub, bearer, "+33611111111")
    assert reply.results[1] == single and reply.results[5] == single


def sms(value: str) -> address_pb2.Address:
    return address_pb2.Address(channel=address_pb2.CHANNEL_SMS, value=value)


def messenger(value: str) -> address_pb2.Address:
    return address_pb2.Address(channel=address_pb2.CHANNEL_MESSENGER, value=value)


async def test_an_opt_out_on_whatsapp_stops_sms_to_the_same_number(
    stub, bearer: Bearer, clean: asyncpg.Pool
) -> None:
    await set_consent(stub, bearer, "+33611111111")
    asked = [("shop-1", sms("+33611111111")), ("shop-1", sms("+33622222222"))]
    reply = await stub.CheckOptOuts(checks(*asked), metadata=bearer("service", sub="outbox"))
    assert [r.opted_out for r in reply.results] == [True, False]
    assert await clean.fetchval("SELECT scope FROM consent_log") == "person"


async def test_a_tenant_narrowed_to_the_channel_keeps_opt_outs_per_channel(
    stub, bearer: Bearer, clean: asyncpg.Pool
) -> None:
    tenant = CHANNEL_SCOPED_TENANT
    await set_consent(stub, bearer, "+33611111111", tenant=tenant)
    asked = [(tenant, whatsapp("+33611111111")), (tenant, sms("+33611111111"))]
    reply = await stub.CheckOptOuts(checks(*asked), metadata=bearer("service", sub="outbox"))
    assert [r.opted_out for r in reply.results] == [True, False]
    assert await clean.fetchval("SELECT scope FROM consent_log") == "channel"


async def test_an_empty_batch_check_has_no_results(stub, bearer: Bearer) -> None:
    reply = await stub.CheckOptOuts(
        routing_pb2.CheckOptOutsRequest(), metadata=bearer("service", sub="outbox")
    )
    assert list(reply.results) == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (("", whatsapp("+33611111111")), "checks[1]: tenant_id is required"),
        (("shop-1", address_pb2.Address(value="+33611111111")), "checks[1]: address.channel"),
        (("shop-1", address_pb2.Address(channel=address_pb2.CHANNEL_SMS, value="12")), "E.164"),
    ],
)
async def test_a_bad_check_in_a_batch_is_named(
    stub, bearer: Bearer, bad: tuple[str, address_pb2.Address], message: str
) -> None:
    good = ("shop-1", whatsapp("+33611111111"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CheckOptOuts(checks(good, bad, good), metadata=bearer("service", sub="outbox"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert message in details and details.startswith("checks[1]") and "\n" not in details


async def test_a_batch_over_the_limit_is_refused(stub, bearer: Bearer) -> None:
    one = ("shop-1", whatsapp("+33611111111"))
    reply = await stub.CheckOptOuts(
        checks(*[one] * MAX_CHECKS), metadata=bearer("service", sub="outbox")
    )
    assert len(reply.results) == MAX_CHECKS
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CheckOptOuts(
            checks(*[one] * (MAX_CHECKS + 1)), metadata=bearer("service", sub="outbox")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"at most {MAX_CHECKS} checks per call, got {MAX_CHECKS + 1}"


@pytest.mark.parametrize("role", ["admin", "owner", "manager", "staff"])
async def test_only_services_may_check_opt_outs(stub, bearer: Bearer, role: str) -> None:
    metadata = bearer(role, None if role == "admin" else "shop-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CheckOptOut(
            routing_pb2.CheckOptOutRequest(tenant_id="shop-1", address=whatsapp("+33611111111")),
            metadata=metadata,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CheckOptOuts(checks(("shop-1", whatsapp("+33611111111"))), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_batch_checks_without_a_token_are_unauthenticated(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CheckOptOuts(checks(("shop-1", whatsapp("+33611111111"))))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_calls_without_a_token_are_unauthenticated(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOptOuts(routing_pb2.ListOptOutsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("role", ["staff", "service"])
async def test_staff_and_services_may_not_set_consent(stub, bearer: Bearer, role: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_consent(stub, bearer, "+33611111111", role=role)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_tenant_role_cannot_touch_another_tenant(stub, bearer: Bearer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetConsent(
            routing_pb2.SetConsentRequest(
                tenant_id="shop-2", address=whatsapp("+33611111111"), state=OPTED_OUT
            ),
            metadata=bearer("manager", "shop-1"),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOptOuts(
            routing_pb2.ListOptOutsRequest(tenant_id="shop-2"), metadata=bearer("owner", "shop-1")
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_admin_must_name_the_tenant(stub, bearer: Bearer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOptOuts(routing_pb2.ListOptOutsRequest(), metadata=bearer("admin"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reply = await stub.ListOptOuts(
        routing_pb2.ListOptOutsRequest(tenant_id="shop-1"), metadata=bearer("admin")
    )
    assert list(reply.opt_outs) == []


@pytest.mark.parametrize(
    ("address", "state", "message"),
    [
        (address_pb2.Address(value="+33611111111"), OPTED_OUT, "channel"),
        (address_pb2.Address(channel=address_pb2.CHANNEL_SMS, value="12"), OPTED_OUT, "E.164"),
        (whatsapp("+33611111111"), routing_pb2.CONSENT_STATE_UNSPECIFIED, "state"),
    ],
)
async def test_malformed_consent_requests_are_invalid(
    stub, bearer: Bearer, address: address_pb2.Address, state: int, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetConsent(
            routing_pb2.SetConsentRequest(address=address, state=state),
            metadata=bearer("owner", "shop-1"),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


async def test_list_opt_outs_pages_through_the_tenants_opt_outs_newest_first(
    stub, bearer: Bearer
) -> None:
    numbers = [f"+3361234560{i}" for i in range(7)]
    for number in numbers:
        await set_consent(stub, bearer, number)
    await set_consent(stub, bearer, "+33699999999", tenant="shop-2")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = await stub.ListOptOuts(
            routing_pb2.ListOptOutsRequest(page_size=3, page_token=token),
            metadata=bearer("manager", "shop-1"),
        )
        pages += 1
        seen += [o.address.value for o in reply.opt_outs]
        assert all(o.tenant_id == "shop-1" and o.actor == "alice" for o in reply.opt_outs)
        token = reply.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == list(reversed(numbers))


async def test_a_forged_page_token_is_invalid(stub, bearer: Bearer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOptOuts(
            routing_pb2.ListOptOutsRequest(page_token="not-a-token"),
            metadata=bearer("owner", "shop-1"),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
