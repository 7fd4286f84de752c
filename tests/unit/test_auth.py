"""Token verification, token minting and tenant scoping (no network; the gRPC side is in
tests/integration/test_grpc_auth.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from infra.auth import (
    AuthInterceptor,
    JwtVerifier,
    PermissionDeniedError,
    Principal,
    ServiceTokenProvider,
    TokenError,
    bearer_token,
    current_principal,
    issue_token,
    tenant_scope,
)
from infra.config import ConfigError

SECRET = "unit-test-secret-that-is-long-enough-0123456789"


def public_pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade_token(header: dict, claims: dict, signing_key: bytes | None) -> str:
    """A token built by hand, as an attacker would: any header, any HMAC key, or no signature."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if signing_key is None:
        return signing_input + "."
    signature = hmac.new(signing_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def claims(**overrides: object) -> dict:
    base = {"sub": "u1", "role": "owner", "tenant_id": "t1", "exp": int(time.time()) + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def rejection(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    return caught.value.reason


def test_issued_token_verifies_to_its_principal() -> None:
    token = issue_token(SECRET, sub="alice", role="manager", tenant_id="shop-1")
    assert JwtVerifier(secret=SECRET).verify(token) == Principal("alice", "manager", "shop-1")


def test_expired_token_is_rejected_but_small_clock_skew_is_tolerated() -> None:
    verifier = JwtVerifier(secret=SECRET)
    long_ago = time.time() - 7200  # expired an hour ago
    assert rejection(verifier, issue_token(SECRET, sub="a", role="admin", now=long_ago)) == (
        "expired"
    )
    skewed = issue_token(SECRET, sub="a", role="admin", ttl_s=60, now=time.time() - 70)
    assert verifier.verify(skewed).role == "admin"


def test_token_signed_with_another_secret_is_rejected() -> None:
    forged = issue_token("another-secret-that-is-also-long-enough-42", sub="a", role="admin")
    assert rejection(JwtVerifier(secret=SECRET), forged) == "bad_signature"


def test_alg_none_token_is_rejected() -> None:
    unsigned = handmade_token({"alg": "none", "typ": "JWT"}, claims(role="admin"), None)
    assert rejection(JwtVerifier(secret=SECRET), unsigned) == "bad_algorithm"


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.eyJ.x", "x" * 9000])
def test_malformed_tokens_are_rejected(garbage: str) -> None:
    assert rejection(JwtVerifier(secret=SECRET), garbage) in {"malformed", "bad_signature"}


def test_rs256_token_is_rejected_when_only_a_secret_is_configured(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    token = issue_token(private_pem(rsa_key), sub="a", role="admin", algorithm="RS256")
    assert rejection(JwtVerifier(secret=SECRET), token) == "bad_algorithm"


def test_public_key_used_as_hmac_secret_is_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    # The classic key-confusion attack: sign HS256 with the (public) verification key.
    pem = public_pem(rsa_key)
    forged = handmade_token({"alg": "HS256", "typ": "JWT"}, claims(role="admin"), pem.encode())
    assert rejection(JwtVerifier(public_key_pem=pem), forged) == "bad_algorithm"


def test_rs256_and_es256_tokens_verify_with_their_public_keys(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    rs = issue_token(private_pem(rsa_key), sub="r", role="staff", tenant_id="t", algorithm="RS256")
    es = issue_token(private_pem(ec_key), sub="e", role="admin", algorithm="ES256")
    assert JwtVerifier(public_key_pem=public_pem(rsa_key)).verify(rs).sub == "r"
    assert JwtVerifier(public_key_pem=public_pem(ec_key)).verify(es).sub == "e"
    assert rejection(JwtVerifier(public_key_pem=public_pem(ec_key)), rs) == "bad_algorithm"


def test_rs256_token_signed_by_another_key_is_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = issue_token(private_pem(other), sub="a", role="admin", algorithm="RS256")
    assert rejection(JwtVerifier(public_key_pem=public_pem(rsa_key)), token) == "bad_signature"


@pytest.mark.parametrize(
    "bad_claims",
    [
        pytest.param(claims(sub=None), id="no-sub"),
        pytest.param(claims(role=None), id="no-role"),
        pytest.param(claims(exp=None), id="no-exp"),
        pytest.param(claims(sub=""), id="empty-sub"),
        pytest.param(claims(role="superuser"), id="unknown-role"),
        pytest.param(claims(role=["admin"]), id="role-not-a-string"),
        pytest.param(claims(role="staff", tenant_id=None), id="tenant-role-without-tenant"),
        pytest.param(claims(role="owner", tenant_id=""), id="tenant-role-empty-tenant"),
    ],
)
def test_tokens_with_missing_or_invalid_claims_are_rejected(bad_claims: dict) -> None:
    token = jwt.encode(bad_claims, SECRET, algorithm="HS256")
    assert rejection(JwtVerifier(secret=SECRET), token) == "bad_claims"


def test_platform_roles_ignore_a_tenant_claim() -> None:
    token = jwt.encode(claims(role="service", tenant_id="t9"), SECRET, algorithm="HS256")
    assert JwtVerifier(secret=SECRET).verify(token) == Principal("u1", "service", None)


def test_cached_verification_still_expires() -> None:
    now = [time.time()]
    verifier = JwtVerifier(secret=SECRET, clock=lambda: now[0])
    token = issue_token(SECRET, sub="a", role="admin", ttl_s=5)
    assert verifier.verify(token).sub == "a"
    assert verifier.verify(token).sub == "a"  # from the cache
    now[0] += 5 + 31
    assert rejection(verifier, token) == "expired"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({}, "set SNAPSELL_JWT_SECRET or SNAPSELL_JWT_PUBLIC_KEY", id="nothing"),
        pytest.param({"secret": "short"}, "at least 32 bytes", id="short-secret"),
        pytest.param({"public_key_pem": "not a pem"}, "not a PEM public key", id="bad-pem"),
    ],
)
def test_verifier_configuration_errors_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        JwtVerifier(**kwargs)
    assert "\n" not in str(caught.value)


def test_weak_rsa_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="2048"):
        JwtVerifier(public_key_pem=public_pem(weak))


def test_verifier_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    monkeypatch.setenv("SNAPSELL_JWT_SECRET", SECRET)
    # Escaped newlines, as when the PEM is squeezed into a one-line variable.
    monkeypatch.setenv("SNAPSELL_JWT_PUBLIC_KEY", public_pem(ec_key).replace("\n", "\\n"))
    assert JwtVerifier.from_env().algorithms == {"HS256", "ES256"}
    monkeypatch.delenv("SNAPSELL_JWT_SECRET")
    monkeypatch.delenv("SNAPSELL_JWT_PUBLIC_KEY")
    with pytest.raises(ConfigError):
        JwtVerifier.from_env()


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("x-other", "1"), ("authorization", "bearer  abc ")), "abc"),
        ((("authorization", b"Bearer abc"),), "abc"),
    ],
)
def test_bearer_token_is_read_from_metadata(metadata: tuple, expected: str) -> None:
    assert bearer_token(metadata) == expected


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "missing"),
        (None, "missing"),
        ((("authorization", "Basic dXNlcjpwdw=="),), "malformed"),
        ((("authorization", "Bearer "),), "malformed"),
    ],
)
def test_bad_authorization_metadata_is_rejected(metadata: tuple | None, reason: str) -> None:
    with pytest.raises(TokenError) as caught:
        bearer_token(metadata)
    assert caught.value.reason == reason


def test_issue_token_refuses_inconsistent_requests() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        issue_token(SECRET, sub="a", role="root")
    with pytest.raises(ValueError, match="needs a tenant_id"):
        issue_token(SECRET, sub="a", role="owner")
    with pytest.raises(ValueError, match="32 bytes"):
        issue_token("short", sub="a", role="admin")


OWNER_T1 = Principal("o", "owner", "t1")
ADMIN = Principal("a", "admin")
SERVICE = Principal("routing", "service")


@pytest.mark.parametrize(
    ("principal", "requested", "expected"),
    [
        (OWNER_T1, "", "t1"),
        (OWNER_T1, None, "t1"),
        (OWNER_T1, "t1", "t1"),
        (ADMIN, "t2", "t2"),
        (SERVICE, "t3", "t3"),
    ],
)
def test_tenant_scope_allows_own_tenant_and_platform_roles(
    principal: Principal, requested: str | None, expected: str
) -> None:
    assert tenant_scope(principal, requested) == expected


@pytest.mark.parametrize(
    ("principal", "requested"),
    [(OWNER_T1, "t2"), (Principal("s", "staff", "t1"), "t2"), (ADMIN, ""), (SERVICE, None)],
)
def test_tenant_scope_refuses_other_tenants_and_unscoped_platform_calls(
    principal: Principal, requested: str | None
) -> None:
    with pytest.raises(PermissionDeniedError):
        tenant_scope(principal, requested)


def test_service_token_is_reused_then_renewed_before_expiry() -> None:
    now = [1_000_000.0]
    provider = ServiceTokenProvider(
        SECRET, "outbox", ttl_s=600, renew_before_s=60, clock=lambda: now[0]
    )
    first = provider.token()
    decoded = jwt.decode(first, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert (decoded["sub"], decoded["role"], decoded["exp"]) == ("outbox", "service", 1_000_600)
    now[0] += 539
    assert provider.token() == first
    now[0] += 1
    renewed = provider.token()
    assert renewed != first
    assert (
        jwt.decode(renewed, SECRET, algorithms=["HS256"], options={"verify_exp": False})["exp"]
        == 1_000_000 + 540 + 600
    )


def test_service_token_provider_needs_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SNAPSELL_JWT_SECRET", raising=False)
    with pytest.raises(ConfigError, match="SNAPSELL_JWT_SECRET"):
        ServiceTokenProvider.from_env("routing")


def test_policy_with_unknown_roles_or_bad_method_names_is_refused() -> None:
    verifier = JwtVerifier(secret=SECRET)
    with pytest.raises(ValueError, match="unknown roles"):
        AuthInterceptor(verifier, {"/a.v1.S/M": frozenset({"root"})})
    with pytest.raises(ValueError, match="full method name"):
        AuthInterceptor(verifier, {"a.v1.S.M": frozenset({"admin"})})


def test_current_principal_outside_a_call_is_a_permission_error() -> None:
    with pytest.raises(PermissionDeniedError):
        current_principal()
