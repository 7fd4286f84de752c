"""Without its database the service answers UNAVAILABLE with one line, never a stack trace."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from nats.js import JetStreamContext
from snapsell.common.v1 import address_pb2
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra.auth import AuthInterceptor, JwtVerifier
from infra.db import create_pool
from infra.grpc_server import GrpcServer
from services.seller_admin.access import SERVICE_FULL_NAME, auth_policy
from services.seller_admin.api import SellerAdminApi
from services.seller_admin.audit_trail import AuditTrail
from tests.integration.seller_admin.conftest import ACCOUNT_SID, SERVICE, Metadata
from tools.dev_keys import DevKeys


@pytest.fixture
async def stub_without_database(
    service_dsn: str, js: JetStreamContext, token_keys: DevKeys
) -> AsyncIterator[seller_admin_pb2_grpc.SellerAdminServiceStub]:
    pool = await create_pool(service_dsn, SERVICE, min_size=1, max_size=2)
    await pool.close()  # the database "went away"
    server = GrpcServer(
        0,
        [SERVICE_FULL_NAME],
        [AuthInterceptor(JwtVerifier.from_env(audience=SERVICE), auth_policy(), service=SERVICE)],
        host="127.0.0.1",
    )
    seller_admin_pb2_grpc.add_SellerAdminServiceServicer_to_server(
        SellerAdminApi(pool, AuditTrail(js)), server.server
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
        yield seller_admin_pb2_grpc.SellerAdminServiceStub(channel)
    await server.stop(1.0)


async def test_calls_are_unavailable_with_a_one_line_message(
    stub_without_database: seller_admin_pb2_grpc.SellerAdminServiceStub,
    bearer: Callable[..., Metadata],
) -> None:
    stub = stub_without_database
    calls = [
        stub.ListSellerPhones(pb.ListSellerPhonesRequest(), metadata=bearer("staff", "shop")),
        stub.ResolveSender(
            pb.ResolveSenderRequest(
                recipient=address_pb2.Address(channel=address_pb2.CHANNEL_SMS, value="+1415"),
                sender=address_pb2.Address(channel=address_pb2.CHANNEL_SMS, value="+3361"),
                account_sid=ACCOUNT_SID,
            ),
            metadata=bearer("service", sub="routing"),
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "database unavailable, retry"
