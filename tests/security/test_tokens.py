"""Per-service identities: every gRPC service of the running system refuses, with
UNAUTHENTICATED, a token that is forged, expired, too long-lived, without or with another
audience, from an unknown key, or signed by a service key claiming another identity or role, and
an identity provider's token with the wrong issuer; a genuine service calling an RPC outside its
allow-list gets PERMISSION_DENIED.

Before per-service keys, one shared HS256 secret signed everything: any holder could mint any
identity, tokens needed no `aud`, `iss` or `iat` and could live for ever, and every RPC open to
"service" was open to every service."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from snapsell.common.v1 import address_pb2
from snapsell.live_session.v1 import live_session_pb2, live_session_pb2_grpc
from snapsell.outbox.v1 import outbox_pb2, outbox_pb2_grpc
from snapsell.routing.v1 import routing_pb2, routing_pb2_grpc
from snapsell.seller_admin.v1 import seller_admin_pb2, seller_admin_pb2_grpc

from infra.auth import issue_token
from infra.keys import new_signing_key
from tools.dev_keys import DevKeys
from tools.stack import SystemStack, start_system

SERVICES = ("routing", "outbox", "live_session", "seller_admin")
IDP_ISSUER = "https://idp.example.test/"
IDP_AUDIENCE = "snapsell-api"
IDP_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
Metadata = tuple[tuple[str, str], ...]
Call = Callable[[grpc.aio.Channel, Metadata], Awaitable[object]]
PHONE = address_pb2.Address(channel=address_pb2.CHANNEL_WHATSAPP, value="+33612345678")

# One read-only call per service that an admin may make.
ADMIN_CALLS: dict[str, Call] = {
    "routing": lambda ch, md: routing_pb2_grpc.RoutingServiceStub(ch).ListOptOuts(
        routing_pb2.ListOptOutsRequest(tenant_id="t1"), metadata=md, timeout=10
    ),
    "outbox": lambda ch, md: outbox_pb2_grpc.OutboxServiceStub(ch).ListDeadLetters(
        outbox_pb2.ListDeadLettersRequest(tenant_id="t1"), metadata=md, timeout=10
    ),
    "live_session": lambda ch, md: live_session_pb2_grpc.LiveSessionServiceStub(ch).ListSessions(
        live_session_pb2.ListSessionsRequest(tenant_id="t1"), metadata=md, timeout=10
    ),
    "seller_admin": lambda ch, md: seller_admin_pb2_grpc.SellerAdminServiceStub(ch).ListTenants(
        seller_admin_pb2.ListTenantsRequest(), metadata=md, timeout=10
    ),
}

# Per service: one service-only RPC, the service that really calls it, and one that does not.
SERVICE_CALLS: dict[str, tuple[Call, str, str]] = {
    "routing": (
        lambda ch, md: routing_pb2_grpc.RoutingServiceStub(ch).CheckOptOut(
            routing_pb2.CheckOptOutRequest(tenant_id="t1", address=PHONE), metadata=md, timeout=10
        ),
        "outbox",
        "live_session",
    ),
    "outbox": (
        lambda ch, md: outbox_pb2_grpc.OutboxServiceStub(ch).Enqueue(
            outbox_pb2.EnqueueRequest(tenant_id="t1"), metadata=md, timeout=10
        ),
        "routing",
        "seller_admin",
    ),
    "live_session": (
        lambda ch, md: live_session_pb2_grpc.LiveSessionServiceStub(ch).Touch(
            live_session_pb2.TouchRequest(tenant_id="t1"), metadata=md, timeout=10
        ),
        "routing",
        "outbox",
    ),
    "seller_admin": (
        lambda ch, md: seller_admin_pb2_grpc.SellerAdminServiceStub(ch).ResolveSender(
            seller_admin_pb2.ResolveSenderRequest(recipient=PHONE, sender=PHONE),
            metadata=md,
            timeout=10,
        ),
        "routing",
        "outbox",
    ),
}


@pytest.fixture(scope="module")
async def system(
    admin_dsn: str, nats_url: str, token_keys: DevKeys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SystemStack]:
    work_dir: Path = tmp_path_factory.mktemp("tokens")
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(IDP_KEY.public_key()))
    idp_keys = work_dir / "idp-keys.json"
    idp_keys.write_text(json.dumps({"keys": [jwk | {"kid": "idp-1", "alg": "RS256"}]}))
    idp_env = {
        "SNAPSELL_IDP_KEYS_FILE": str(idp_keys),
        "SNAPSELL_IDP_ISSUER": IDP_ISSUER,
        "SNAPSELL_IDP_AUDIENCE": IDP_AUDIENCE,
    }
    stack = await start_system(admin_dsn, nats_url, token_keys, work_dir, env=idp_env)
    try:
        yield stack
    finally:
        await stack.stop()


def signed(keys: DevKeys, key_id: str, **claims: object) -> str:
    """Claims of the attacker's choosing under a genuine key of ours."""
    now = int(time.time())
    body = {"iss": "snapsell", "sub": "ops", "role": "admin", "iat": now, "exp": now + 60}
    body = {k: v for k, v in (body | claims).items() if v is not None}
    return jwt.encode(
        body, keys.key(key_id).private_key, algorithm="ES256", headers={"kid": key_id}
    )


def idp_token(**claims: object) -> str:
    now = int(time.time())
    body = {"iss": IDP_ISSUER, "aud": IDP_AUDIENCE, "sub": "idp-admin", "role": "admin"}
    body = {k: v for k, v in (body | {"iat": now, "exp": now + 600} | claims).items() if v}
    return jwt.encode(body, IDP_KEY, algorithm="RS256", headers={"kid": "idp-1"})


BAD_TOKENS: dict[str, Callable[[DevKeys, str], str]] = {
    "forged": lambda keys, aud: issue_token(
        new_signing_key("operator"), sub="ops", role="admin", audience=aud
    ),
    "expired": lambda keys, aud: keys.token("admin", sub="ops", audience=aud, ttl_s=-120),
    "over-long": lambda keys, aud: signed(keys, "operator", aud=aud, exp=int(time.time()) + 7200),
    "no-aud": lambda keys, aud: signed(keys, "operator"),
    "wrong-aud": lambda keys, aud: signed(keys, "operator", aud="gateway"),
    "no-iat": lambda keys, aud: signed(keys, "operator", aud=aud, iat=None),
    "unknown-kid": lambda keys, aud: issue_token(
        new_signing_key("intruder"), sub="intruder", role="service", audience=aud
    ),
    "service-key-claims-another-service": lambda keys, aud: signed(
        keys, "routing", aud=aud, sub="outbox", role="service"
    ),
    "service-key-claims-admin": lambda keys, aud: signed(keys, "routing", aud=aud, sub="routing"),
    "idp-wrong-iss": lambda keys, aud: idp_token(iss="https://evil.example.test/"),
    "idp-wrong-aud": lambda keys, aud: idp_token(aud=aud),
}


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


async def outcome(system: SystemStack, service: str, call: Call, token: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(system.address(service)) as channel:
        try:
            await call(channel, bearer(token))
        except grpc.aio.AioRpcError as error:
            assert "\n" not in (error.details() or "")
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("service", SERVICES)
async def test_genuine_operator_and_identity_provider_tokens_are_accepted(
    system: SystemStack, token_keys: DevKeys, service: str
) -> None:
    call = ADMIN_CALLS[service]
    operator = token_keys.token("admin", sub="ops", audience=service)
    assert await outcome(system, service, call, operator) == grpc.StatusCode.OK
    assert await outcome(system, service, call, idp_token()) == grpc.StatusCode.OK


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
@pytest.mark.parametrize("service", SERVICES)
async def test_unacceptable_tokens_are_unauthenticated(
    system: SystemStack, token_keys: DevKeys, service: str, case: str
) -> None:
    token = BAD_TOKENS[case](token_keys, service)
    code = await outcome(system, service, ADMIN_CALLS[service], token)
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("service", SERVICES)
async def test_a_service_outside_an_rpcs_allow_list_is_permission_denied(
    system: SystemStack, token_keys: DevKeys, service: str
) -> None:
    call, allowed, other = SERVICE_CALLS[service]
    as_allowed = token_keys.token("service", sub=allowed, audience=service)
    assert await outcome(system, service, call, as_allowed) not in {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
    as_other = token_keys.token("service", sub=other, audience=service)
    assert await outcome(system, service, call, as_other) == grpc.StatusCode.PERMISSION_DENIED
