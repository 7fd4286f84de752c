"""`AuthInterceptor` on a real gRPC server: every way a token can be wrong, every handler shape,
and the caller's identity as the servicer sees it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import REGISTRY

from infra.auth import IdentityProvider, JwtVerifier, issue_token
from infra.grpc_server import GrpcServer
from infra.keys import KeySetFile, new_signing_key
from tests.integration.infra.grpc_echo import (
    AUDIENCE,
    KEYS,
    METRICS_SERVICE,
    bearer,
    echo_server,
    echo_token,
    method,
    running,
)

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
IDP_ISSUER = "https://idp.example.test/"
IDP_AUDIENCE = "snapsell-api"


@pytest.fixture(scope="module")
async def echo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GrpcServer]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    idp_keys = tmp_path_factory.mktemp("idp") / "keys.json"
    idp_keys.write_text(json.dumps({"keys": [jwk | {"kid": "idp-1", "alg": "RS256"}]}))
    verifier = JwtVerifier(
        audience=AUDIENCE,
        trusted_keys=KeySetFile(
            str(KEYS.trusted_keys_file), setting="keys", algorithms=frozenset({"ES256"})
        ),
        identity_provider=IdentityProvider(
            KeySetFile(str(idp_keys), setting="idp", algorithms=frozenset({"RS256"})),
            IDP_ISSUER,
            IDP_AUDIENCE,
        ),
    )
    async with running(echo_server(verifier)) as server:
        yield server


@pytest.fixture(scope="module")
async def channel(echo: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{echo.bound_port}") as channel:
        yield channel


def hs(role: str, tenant_id: str | None = None, ttl_s: int = 600, now: float | None = None) -> str:
    """A token of ours for the echo server: routing's for `service`, else the operator's."""
    if role == "service":
        return echo_token("service")
    operator = KEYS.key("operator")
    return issue_token(
        operator,
        sub=f"{role}-user",
        role=role,
        tenant_id=tenant_id,
        audience=AUDIENCE,
        ttl_s=ttl_s,
        now=now,
    )


def signed(key_id: str, claims: dict) -> str:
    """Claims of our choosing, signed with a genuine key of ours."""
    now = int(time.time())
    body = {"iss": "snapsell", "aud": AUDIENCE, "iat": now, "exp": now + 60} | claims
    body = {name: value for name, value in body.items() if value is not None}
    key = KEYS.key(key_id).private_key
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": key_id})


def alg_none_admin() -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {"sub": "eve", "role": "admin", "exp": int(time.time()) + 600}
    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': 'operator'})}.{part(claims)}."


def idp_token(key: rsa.RSAPrivateKey = RSA_KEY, **overrides: object) -> str:
    now = int(time.time())
    claims = {
        "iss": IDP_ISSUER,
        "aud": IDP_AUDIENCE,
        "sub": "idp-user",
        "role": "owner",
        "tenant_id": "t7",
        "iat": now,
        "exp": now + 600,
    } | overrides
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "idp-1"})


TOKENS: dict[str, Callable[[], str]] = {
    "expired": lambda: hs("admin", ttl_s=60, now=time.time() - 600),
    "forged": lambda: issue_token(
        new_signing_key("operator"), sub="e", role="admin", audience=AUDIENCE
    ),
    "alg-none": alg_none_admin,
    "malformed": lambda: "not.a.jwt",
    "for-another-service": lambda: signed("operator", {"sub": "e", "role": "admin", "aud": "x"}),
    "no-audience": lambda: signed("operator", {"sub": "e", "role": "admin", "aud": None}),
    "over-an-hour": lambda: hs("admin", ttl_s=3601),
    "unknown-kid": lambda: issue_token(
        new_signing_key("intruder"), sub="intruder", role="service", audience=AUDIENCE
    ),
    "service-key-as-admin": lambda: signed("routing", {"sub": "routing", "role": "admin"}),
    "service-key-as-another-service": lambda: signed(
        "routing", {"sub": "outbox", "role": "service"}
    ),
    "idp-rs256-other-key": lambda: idp_token(OTHER_RSA_KEY),
    "idp-wrong-issuer": lambda: idp_token(iss="https://evil.test/"),
    "idp-no-audience": lambda: idp_token(aud=None),
    "tenant-role-without-tenant": lambda: signed("operator", {"sub": "o", "role": "owner"}),
}


async def call(
    channel: grpc.aio.Channel, name: str, token: str | None
) -> tuple[grpc.StatusCode, str]:
    metadata = bearer(token) if token is not None else ()
    try:
        await channel.unary_unary(method(name))(b"", metadata=metadata, timeout=2)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_call_without_token_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    assert await call(channel, "WhoAmI", None) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "missing bearer token",
    )


@pytest.mark.parametrize("case", sorted(TOKENS))
async def test_unacceptable_tokens_are_unauthenticated_with_a_one_line_reason(
    channel: grpc.aio.Channel, case: str
) -> None:
    token = TOKENS[case]()
    code, details = await call(channel, "WhoAmI", token)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert details and "\n" not in details and token not in details


@pytest.mark.parametrize(
    ("role", "tenant_id", "name", "expected"),
    [
        ("owner", "t1", "OwnerOnly", grpc.StatusCode.OK),
        ("admin", None, "OwnerOnly", grpc.StatusCode.OK),
        ("staff", "t1", "OwnerOnly", grpc.StatusCode.PERMISSION_DENIED),
        ("service", None, "OwnerOnly", grpc.StatusCode.PERMISSION_DENIED),
        ("admin", None, "Unlisted", grpc.StatusCode.PERMISSION_DENIED),
        ("service", None, "WhoAmI", grpc.StatusCode.OK),
    ],
)
async def test_roles_are_checked_against_the_method_policy(
    channel: grpc.aio.Channel, role: str, tenant_id: str | None, name: str, expected: object
) -> None:
    code, details = await call(channel, name, hs(role, tenant_id))
    assert code == expected
    if code == grpc.StatusCode.PERMISSION_DENIED:
        assert "\n" not in details


async def test_rs256_token_from_an_external_provider_is_accepted(
    channel: grpc.aio.Channel,
) -> None:
    for token in (idp_token(), idp_token(aud=["another-api", IDP_AUDIENCE])):
        reply = await channel.unary_unary(method("OwnerOnly"))(b"", metadata=bearer(token))
        assert json.loads(reply)["sub"] == "idp-user"


async def test_a_service_outside_the_methods_callers_is_denied(
    channel: grpc.aio.Channel,
) -> None:
    code, details = await call(channel, "WhoAmI", echo_token("service", sub="outbox"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == "service 'outbox' may not call WhoAmI"


async def test_servicer_sees_the_callers_principal(channel: grpc.aio.Channel) -> None:
    reply = await channel.unary_unary(method("WhoAmI"))(
        b"", metadata=bearer(hs("manager", "shop-9")), timeout=2
    )
    body = json.loads(reply)
    assert (body["sub"], body["role"], body["tenant_id"]) == ("manager-user", "manager", "shop-9")


async def test_concurrent_callers_each_see_their_own_principal(channel: grpc.aio.Channel) -> None:
    who_am_i = channel.unary_unary(method("WhoAmI"))
    tokens = [echo_token("staff", f"t{i}", f"u{i}") for i in range(60)]
    replies = await asyncio.gather(*(who_am_i(b"", metadata=bearer(t), timeout=5) for t in tokens))
    assert [(json.loads(r)["sub"], json.loads(r)["tenant_id"]) for r in replies] == [
        (f"u{i}", f"t{i}") for i in range(60)
    ]


@pytest.mark.parametrize("name", ["StreamGen", "StreamWrite"])
async def test_server_streaming_handlers_are_guarded_and_see_the_principal(
    channel: grpc.aio.Channel, name: str
) -> None:
    stream = channel.unary_stream(method(name))
    replies = [json.loads(r) async for r in stream(b"", metadata=bearer(hs("staff", "t3")))]
    assert replies and all(r["tenant_id"] == "t3" for r in replies)

    for token, expected in [(None, "UNAUTHENTICATED"), (hs("service"), "PERMISSION_DENIED")]:
        metadata = bearer(token) if token else ()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [r async for r in stream(b"", metadata=metadata, timeout=2)]
        assert caught.value.code().name == expected


async def test_client_streaming_handler_is_guarded_and_sees_the_principal(
    channel: grpc.aio.Channel,
) -> None:
    collect = channel.stream_unary(method("Collect"))
    reply = await collect(iter([b"a", b"b"]), metadata=bearer(hs("service")), timeout=2)
    assert reply == b"a|b|routing"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(iter([b"a"]), metadata=bearer(hs("owner", "t1")), timeout=2)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_denials_are_counted_and_logged_without_the_token(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    labels = {"service": METRICS_SERVICE, "method": method("WhoAmI"), "reason": "bad_signature"}
    before = REGISTRY.get_sample_value("snapsell_auth_denials_total", labels) or 0.0
    forged = TOKENS["forged"]()
    with caplog.at_level(logging.WARNING, logger="infra.auth"):
        assert (await call(channel, "WhoAmI", forged))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert REGISTRY.get_sample_value("snapsell_auth_denials_total", labels) == before + 1
    [record] = [r for r in caplog.records if r.getMessage() == "auth.denied"]
    assert record.fields["reason"] == "bad_signature"
    assert record.fields["method"] == method("WhoAmI")
    assert forged not in caplog.text and forged not in json.dumps(record.fields)
