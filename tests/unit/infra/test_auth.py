"""Token verification, token minting, key sets and tenant scoping (no network; the gRPC side is
in tests/integration/infra/test_grpc_auth.py and tests/security/test_tokens.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from infra.auth import (
    Access,
    AuthInterceptor,
    IdentityProvider,
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
from infra.keys import KeySetFile, SigningKey, key_set_document, new_signing_key

AUDIENCE = "outbox"
IDP_ISSUER = "https://idp.example.test/"
IDP_AUDIENCE = "snapsell-api"
ROUTING = new_signing_key("routing")
OPERATOR = new_signing_key("operator")
ES256 = frozenset({"ES256"})


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
    now = int(time.time())
    base = {
        "iss": "snapsell",
        "aud": AUDIENCE,
        "sub": "u1",
        "role": "owner",
        "tenant_id": "t1",
        "iat": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(key: SigningKey, body: dict) -> str:
    return jwt.encode(body, key.private_key, algorithm="ES256", headers={"kid": key.kid})


def key_file(path: Path, *keys: SigningKey) -> KeySetFile:
    path.write_text(key_set_document(keys))
    return KeySetFile(str(path), setting="trusted keys", algorithms=ES256)


@pytest.fixture
def trusted(tmp_path: Path) -> KeySetFile:
    return key_file(tmp_path / "trusted.json", ROUTING, OPERATOR)


@pytest.fixture
def verifier(trusted: KeySetFile) -> JwtVerifier:
    return JwtVerifier(audience=AUDIENCE, trusted_keys=trusted)


@pytest.fixture(scope="module")
def idp_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def idp(tmp_path: Path, idp_key: rsa.RSAPrivateKey) -> IdentityProvider:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key()))
    path = tmp_path / "idp.json"
    path.write_text(json.dumps({"keys": [jwk | {"kid": "idp-1", "alg": "RS256"}]}))
    keys = KeySetFile(str(path), setting="idp keys", algorithms=frozenset({"RS256", "ES256"}))
    return IdentityProvider(keys, IDP_ISSUER, IDP_AUDIENCE)


def idp_token(key: rsa.RSAPrivateKey, **overrides: object) -> str:
    body = claims(iss=IDP_ISSUER, aud=IDP_AUDIENCE, sub="idp-user") | overrides
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "idp-1"})


def rejection(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(TokenError) as caught:
        verifier.verify(token)
    return caught.value.reason


def test_issued_tokens_verify_to_their_principal(verifier: JwtVerifier) -> None:
    owner = issue_token(OPERATOR, sub="alice", role="manager", tenant_id="s1", audience=AUDIENCE)
    assert verifier.verify(owner) == Principal("alice", "manager", "s1")
    service = issue_token(ROUTING, sub="routing", role="service", audience=AUDIENCE)
    assert verifier.verify(service) == Principal("routing", "service", None)


def test_expired_token_is_rejected_but_small_clock_skew_is_tolerated(
    verifier: JwtVerifier,
) -> None:
    long_ago = time.time() - 7200
    old = issue_token(OPERATOR, sub="a", role="admin", audience=AUDIENCE, now=long_ago)
    assert rejection(verifier, old) == "expired"
    skewed = issue_token(
        OPERATOR, sub="a", role="admin", audience=AUDIENCE, ttl_s=60, now=time.time() - 70
    )
    assert verifier.verify(skewed).role == "admin"


@pytest.mark.parametrize(
    ("key", "body", "reason"),
    [
        pytest.param(new_signing_key("operator"), claims(), "bad_signature", id="forged"),
        pytest.param(new_signing_key("intruder"), claims(), "unknown_kid", id="unknown-kid"),
        pytest.param(OPERATOR, claims(aud=None), "bad_claims", id="no-aud"),
        pytest.param(OPERATOR, claims(aud="routing"), "bad_audience", id="wrong-aud"),
        pytest.param(OPERATOR, claims(iss=None), "bad_claims", id="no-iss"),
        pytest.param(OPERATOR, claims(iss="someone"), "bad_issuer", id="wrong-iss"),
        pytest.param(OPERATOR, claims(iat=None), "bad_claims", id="no-iat"),
        pytest.param(OPERATOR, claims(iat=int(time.time()) + 600), "not_yet_valid", id="future"),
        pytest.param(
            OPERATOR,
            claims(role="admin", iat=int(time.time()), exp=int(time.time()) + 3601),
            "too_long",
            id="admin-over-an-hour",
        ),
        pytest.param(
            ROUTING,
            claims(role="service", sub="routing", exp=int(time.time()) + 3601),
            "too_long",
            id="service-over-an-hour",
        ),
        pytest.param(
            OPERATOR,
            claims(exp=int(time.time()) + 3601),
            "too_long",
            id="tenant-role-over-the-default",
        ),
        pytest.param(
            ROUTING, claims(role="service", sub="outbox"), "wrong_identity", id="other-service"
        ),
        pytest.param(ROUTING, claims(role="admin", sub="routing"), "wrong_identity", id="admin"),
        pytest.param(OPERATOR, claims(role="service", sub="routing"), "wrong_identity", id="op"),
        pytest.param(OPERATOR, claims(sub=None), "bad_claims", id="no-sub"),
        pytest.param(OPERATOR, claims(role=None), "bad_claims", id="no-role"),
        pytest.param(OPERATOR, claims(exp=None), "bad_claims", id="no-exp"),
        pytest.param(OPERATOR, claims(role="superuser"), "bad_claims", id="unknown-role"),
        pytest.param(OPERATOR, claims(role=["admin"]), "bad_claims", id="role-not-a-string"),
        pytest.param(OPERATOR, claims(tenant_id=None), "bad_claims", id="no-tenant"),
    ],
)
def test_unacceptable_tokens_are_rejected(
    verifier: JwtVerifier, key: SigningKey, body: dict, reason: str
) -> None:
    assert rejection(verifier, signed(key, body)) == reason


def test_tenant_token_lifetime_is_configurable_up_to_a_cap(trusted: KeySetFile) -> None:
    long_lived = signed(OPERATOR, claims(exp=int(time.time()) + 8 * 3600))
    assert JwtVerifier(audience=AUDIENCE, trusted_keys=trusted, tenant_max_ttl_s=8 * 3600).verify(
        long_lived
    ) == Principal("u1", "owner", "t1")
    admin = signed(OPERATOR, claims(role="admin", exp=int(time.time()) + 8 * 3600))
    verifier = JwtVerifier(audience=AUDIENCE, trusted_keys=trusted, tenant_max_ttl_s=8 * 3600)
    assert rejection(verifier, admin) == "too_long"
    with pytest.raises(ConfigError, match="lifetime"):
        JwtVerifier(audience=AUDIENCE, trusted_keys=trusted, tenant_max_ttl_s=48 * 3600)


def test_alg_none_and_hmac_tokens_are_rejected(verifier: JwtVerifier) -> None:
    header = {"alg": "none", "typ": "JWT", "kid": "operator"}
    assert rejection(verifier, handmade_token(header, claims(role="admin"), None)) == (
        "bad_algorithm"
    )
    # Key confusion: HMAC keyed with the public key material an attacker can read.
    public = json.dumps(OPERATOR.public_jwk()).encode()
    header = {"alg": "HS256", "typ": "JWT", "kid": "operator"}
    forged = handmade_token(header, claims(role="admin"), public)
    assert rejection(verifier, forged) == "bad_algorithm"


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.eyJ.x", "x" * 9000])
def test_malformed_tokens_are_rejected(verifier: JwtVerifier, garbage: str) -> None:
    assert rejection(verifier, garbage) in {"malformed", "unknown_kid"}


def test_identity_provider_tokens_need_its_issuer_our_audience_and_iat(
    trusted: KeySetFile, idp: IdentityProvider, idp_key: rsa.RSAPrivateKey
) -> None:
    verifier = JwtVerifier(audience=AUDIENCE, trusted_keys=trusted, identity_provider=idp)
    assert verifier.verify(idp_token(idp_key)) == Principal("idp-user", "owner", "t1")
    several = idp_token(idp_key, aud=["other-api", IDP_AUDIENCE])
    assert verifier.verify(several).sub == "idp-user"
    assert rejection(verifier, idp_token(idp_key, iss="https://evil.test/")) == "bad_issuer"
    assert rejection(verifier, idp_token(idp_key, aud="other-api")) == "bad_audience"
    assert rejection(verifier, idp_token(idp_key, aud=None)) == "bad_claims"
    assert rejection(verifier, idp_token(idp_key, iat=None)) == "bad_claims"
    assert rejection(verifier, idp_token(idp_key, role="service", sub="routing")) == (
        "wrong_identity"
    )
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert rejection(verifier, idp_token(other)) == "bad_signature"
    # Our own issuer and audience do not make an IdP-signed token one of ours.
    assert rejection(verifier, idp_token(idp_key, iss="snapsell", aud=AUDIENCE)) in {
        "bad_issuer",
        "bad_audience",
    }


def test_a_key_id_both_ours_and_the_identity_providers_is_refused(
    tmp_path: Path, idp: IdentityProvider
) -> None:
    trusted = key_file(tmp_path / "trusted.json", new_signing_key("idp-1"))
    with pytest.raises(ConfigError, match="both ours and the IdP's"):
        JwtVerifier(audience=AUDIENCE, trusted_keys=trusted, identity_provider=idp)


def test_a_rotated_key_set_file_is_reloaded_for_an_unknown_kid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trusted = key_file(tmp_path / "trusted.json", OPERATOR)
    verifier = JwtVerifier(audience=AUDIENCE, trusted_keys=trusted)
    new = new_signing_key("operator.2027-01")
    token = issue_token(new, sub="a", role="admin", audience=AUDIENCE)
    assert rejection(verifier, token) == "unknown_kid"
    (tmp_path / "trusted.json").write_text(key_set_document([OPERATOR, new]))
    stat = (tmp_path / "trusted.json").stat()
    os.utime(tmp_path / "trusted.json", (stat.st_atime, stat.st_mtime + 5))
    monkeypatch.setattr("infra.keys.RELOAD_INTERVAL_S", 0.0)
    assert verifier.verify(token) == Principal("a", "admin", None)


def test_cached_verification_still_expires(trusted: KeySetFile) -> None:
    now = [time.time()]
    verifier = JwtVerifier(audience=AUDIENCE, trusted_keys=trusted, clock=lambda: now[0])
    token = issue_token(OPERATOR, sub="a", role="admin", audience=AUDIENCE, ttl_s=5)
    assert verifier.verify(token).sub == "a"
    assert verifier.verify(token).sub == "a"  # from the cache
    now[0] += 5 + 31
    assert rejection(verifier, token) == "expired"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param("not json", "not a JWKS document", id="not-json"),
        pytest.param(json.dumps({"keys": [{"kty": "EC"}]}), "needs a 'kid'", id="no-kid"),
        pytest.param(
            json.dumps({"keys": [OPERATOR.public_jwk(), OPERATOR.public_jwk()]}),
            "appears twice",
            id="duplicate",
        ),
        pytest.param(
            json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x", "alg": "HS256"}]}),
            "uses HS256",
            id="hmac",
        ),
        pytest.param(
            json.dumps(
                {
                    "keys": [
                        json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ROUTING.private_key))
                        | {"kid": "routing"}
                    ]
                }
            ),
            "is a private key",
            id="private",
        ),
    ],
)
def test_bad_key_sets_are_one_line_configuration_errors(
    tmp_path: Path, document: str, message: str
) -> None:
    (tmp_path / "keys.json").write_text(document)
    with pytest.raises(ConfigError, match=message) as caught:
        KeySetFile(str(tmp_path / "keys.json"), setting="keys", algorithms=ES256)
    assert "\n" not in str(caught.value)


def test_weak_rsa_identity_provider_keys_are_refused(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(weak.public_key())) | {"kid": "w"}
    (tmp_path / "idp.json").write_text(json.dumps({"keys": [jwk]}))
    with pytest.raises(ConfigError, match="2048"):
        KeySetFile(str(tmp_path / "idp.json"), setting="idp", algorithms=frozenset({"RS256"}))


def test_verifier_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idp: IdentityProvider
) -> None:
    for name in ("SNAPSELL_JWT_SECRET", "SNAPSELL_JWT_PUBLIC_KEY", "SNAPSELL_IDP_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SNAPSELL_TRUSTED_KEYS_FILE", raising=False)
    with pytest.raises(ConfigError, match="SNAPSELL_TRUSTED_KEYS_FILE"):
        JwtVerifier.from_env(AUDIENCE)
    (tmp_path / "trusted.json").write_text(key_set_document([OPERATOR]))
    monkeypatch.setenv("SNAPSELL_TRUSTED_KEYS_FILE", str(tmp_path / "trusted.json"))
    token = issue_token(OPERATOR, sub="a", role="admin", audience=AUDIENCE)
    assert JwtVerifier.from_env(AUDIENCE).verify(token).sub == "a"
    monkeypatch.setenv("SNAPSELL_IDP_ISSUER", IDP_ISSUER)
    with pytest.raises(ConfigError, match="SNAPSELL_IDP_KEYS_FILE"):
        JwtVerifier.from_env(AUDIENCE)
    monkeypatch.setenv("SNAPSELL_JWT_SECRET", "a-shared-secret-that-nobody-reads-anymore")
    with pytest.raises(ConfigError, match="no longer read"):
        JwtVerifier.from_env(AUDIENCE)


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
        issue_token(OPERATOR, sub="a", role="root", audience=AUDIENCE)
    with pytest.raises(ValueError, match="needs a tenant_id"):
        issue_token(OPERATOR, sub="a", role="owner", audience=AUDIENCE)
    with pytest.raises(ValueError, match="may not sign service tokens"):
        issue_token(OPERATOR, sub="routing", role="service", audience=AUDIENCE)
    with pytest.raises(ValueError, match="only its own service tokens"):
        issue_token(ROUTING, sub="outbox", role="service", audience=AUDIENCE)


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


def test_service_token_is_for_one_peer_reused_then_renewed_before_expiry() -> None:
    now = [1_000_000.0]
    provider = ServiceTokenProvider(
        ROUTING, "outbox", ttl_s=600, renew_before_s=60, clock=lambda: now[0]
    )
    first = provider.token()
    public = ROUTING.private_key.public_key()
    options = {"verify_exp": False, "verify_iat": False}
    decoded = jwt.decode(first, public, algorithms=["ES256"], audience="outbox", options=options)
    assert (decoded["sub"], decoded["role"], decoded["aud"]) == ("routing", "service", "outbox")
    assert (decoded["iat"], decoded["exp"]) == (1_000_000, 1_000_600)
    assert jwt.get_unverified_header(first)["kid"] == "routing"
    now[0] += 539
    assert provider.token() == first
    now[0] += 1
    renewed = provider.token()
    assert renewed != first
    again = jwt.decode(renewed, public, algorithms=["ES256"], audience="outbox", options=options)
    assert again["exp"] == 1_000_000 + 540 + 600


def test_service_token_provider_needs_a_signing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SNAPSELL_SIGNING_KEY_FILE", raising=False)
    with pytest.raises(ConfigError, match="SNAPSELL_SIGNING_KEY_FILE"):
        ServiceTokenProvider.from_env("routing", "outbox")
    rsa_pem = tmp_path / "rsa.pem"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    monkeypatch.setenv("SNAPSELL_SIGNING_KEY_FILE", str(rsa_pem))
    with pytest.raises(ConfigError, match="P-256"):
        ServiceTokenProvider.from_env("routing", "outbox")
    p384 = SigningKey("x", ec.generate_private_key(ec.SECP384R1()))
    rsa_pem.write_bytes(p384.private_pem())
    with pytest.raises(ConfigError, match="P-256"):
        ServiceTokenProvider.from_env("routing", "outbox")


def test_policy_must_name_callers_with_access_entries(verifier: JwtVerifier) -> None:
    with pytest.raises(ValueError, match="unknown roles"):
        AuthInterceptor(verifier, {"/a.v1.S/M": Access(roles=frozenset({"root"}))})
    with pytest.raises(ValueError, match="unknown roles"):
        # "service" is not a role a policy lists: services are named one by one.
        AuthInterceptor(verifier, {"/a.v1.S/M": Access(roles=frozenset({"service"}))})
    with pytest.raises(ValueError, match="must be an Access"):
        AuthInterceptor(verifier, {"/a.v1.S/M": frozenset({"admin"})})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="full method name"):
        AuthInterceptor(verifier, {"a.v1.S.M": Access(roles=frozenset({"admin"}))})


def test_current_principal_outside_a_call_is_a_permission_error() -> None:
    with pytest.raises(PermissionDeniedError):
        current_principal()
