"""JWT authentication and role-based access for gRPC services.

Callers send `authorization: Bearer <JWT>`. Tokens are HS256 with `SNAPSELL_JWT_SECRET`, or
RS256/ES256 verified with the PEM public key in `SNAPSELL_JWT_PUBLIC_KEY` (an external identity
provider); both may be configured. The algorithm is pinned by the configured key, never chosen
by the token. Claims: `sub`, `role`, `exp`, and `tenant_id` for tenant roles.

Errors: `TokenError` (-> UNAUTHENTICATED) and `PermissionDeniedError` (-> PERMISSION_DENIED),
both with a one-line message safe to return to the caller.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from prometheus_client import Counter

from infra.config import ConfigError, env_optional
from infra.grpc_server import OPEN_METHOD_PREFIXES, aborting_handler
from infra.log import service_name

ROLES = frozenset({"admin", "owner", "manager", "staff", "service"})
TENANT_ROLES = frozenset({"owner", "manager", "staff"})
LEEWAY_S = 30
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32
_MAX_TOKEN_CHARS = 8192
_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    role: str
    tenant_id: str | None = None


class TokenError(Exception):
    """The token is missing or not acceptable; `reason` is a short metric label."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PermissionDeniedError(Exception):
    """The caller is authenticated but may not do this."""

    def __init__(self, message: str, reason: str = "forbidden") -> None:
        super().__init__(message)
        self.reason = reason


_CURRENT_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("snapsell_principal")
_log = logging.getLogger(__name__)
AUTH_DENIALS = Counter(
    "snapsell_auth_denials_total",
    "gRPC calls refused by the auth interceptor",
    ["service", "method", "reason"],
)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served (set by `AuthInterceptor`)."""
    try:
        return _CURRENT_PRINCIPAL.get()
    except LookupError:
        raise PermissionDeniedError("no authenticated caller") from None


def tenant_scope(principal: Principal, requested_tenant_id: str | None) -> str:
    """The tenant to act on. Admin and service must name one; tenant roles only their own
    (an empty request means "mine")."""
    requested = requested_tenant_id or ""
    if principal.role in TENANT_ROLES:
        if requested and requested != principal.tenant_id:
            raise PermissionDeniedError(f"role '{principal.role}' may not act on another tenant")
        return principal.tenant_id or ""
    if not requested:
        raise PermissionDeniedError(f"role '{principal.role}' must name a tenant_id")
    return requested


def _principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not sub:
        raise TokenError("token 'sub' claim must be a non-empty string", "bad_claims")
    if not isinstance(role, str) or role not in ROLES:
        raise TokenError("token 'role' claim is not a known role", "bad_claims")
    if role not in TENANT_ROLES:
        # Platform roles act across tenants; a stray tenant_id claim must not narrow or widen that.
        return Principal(sub=sub, role=role)
    tenant_id = claims.get("tenant_id")
    if not isinstance(tenant_id, str) or not tenant_id:
        raise TokenError(f"role '{role}' token lacks a tenant_id claim", "bad_claims")
    return Principal(sub=sub, role=role, tenant_id=tenant_id)


def _public_key_algorithm(pem: str) -> tuple[str, Any]:
    try:
        # Tolerate a PEM whose newlines were escaped to fit in one environment variable line.
        key = load_pem_public_key(pem.replace("\\n", "\n").encode())
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError("SNAPSELL_JWT_PUBLIC_KEY is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ConfigError("SNAPSELL_JWT_PUBLIC_KEY: RSA keys must be at least 2048 bits")
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise ConfigError("SNAPSELL_JWT_PUBLIC_KEY must be an RSA or P-256 EC public key")


_DECODE_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token expired", "expired"),
    (jwt.ImmatureSignatureError, "token not valid yet", "not_yet_valid"),
    (jwt.InvalidSignatureError, "token signature invalid", "bad_signature"),
    (jwt.InvalidAlgorithmError, "token algorithm not accepted", "bad_algorithm"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim", "bad_claims"),
    (jwt.InvalidAudienceError, "token audience not accepted", "bad_claims"),
    (jwt.InvalidIssuerError, "token issuer not accepted", "bad_claims"),
    (jwt.DecodeError, "malformed token", "malformed"),
)


class JwtVerifier:
    """Verifies bearer tokens; results are cached per token string until the token expires."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key_pem: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys: dict[str, Any] = {}
        if secret:
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise ConfigError(f"SNAPSELL_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
            self._keys["HS256"] = secret
        if public_key_pem:
            algorithm, key = _public_key_algorithm(public_key_pem)
            self._keys[algorithm] = key
        if not self._keys:
            raise ConfigError("set SNAPSELL_JWT_SECRET or SNAPSELL_JWT_PUBLIC_KEY")
        self._clock = clock
        self._jwt = jwt.PyJWT()
        # Service tokens are reused for an hour; re-verifying the signature on every call would
        # be most of the interceptor's cost.
        self._cache: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def from_env(cls) -> JwtVerifier:
        return cls(
            secret=env_optional("SNAPSELL_JWT_SECRET"),
            public_key_pem=env_optional("SNAPSELL_JWT_PUBLIC_KEY"),
        )

    @property
    def algorithms(self) -> frozenset[str]:
        return frozenset(self._keys)

    def verify(self, token: str) -> Principal:
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            principal, exp = cached
            if now <= exp + LEEWAY_S:
                return principal
            del self._cache[token]
            raise TokenError("token expired", "expired")
        principal, exp = self._decode(token)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[token] = (principal, exp)
        return principal

    def _decode(self, token: str) -> tuple[Principal, float]:
        if not token or len(token) > _MAX_TOKEN_CHARS:
            raise TokenError("malformed token", "malformed")
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
            if key is None:
                raise TokenError("token algorithm not accepted", "bad_algorithm")
            claims = self._jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                leeway=LEEWAY_S,
                options={"require": ["sub", "role", "exp"]},
            )
        except jwt.InvalidTokenError as error:
            for error_type, message, reason in _DECODE_ERRORS:
                if isinstance(error, error_type):
                    raise TokenError(message, reason) from None
            raise TokenError("invalid token", "invalid") from None
        return _principal_from_claims(claims), float(claims["exp"])


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the `authorization: Bearer ...` metadata entry, or raise TokenError."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError("authorization metadata must be 'Bearer <token>'", "malformed")
        return token.strip()
    raise TokenError("missing bearer token", "missing")


def issue_token(
    secret: str,
    *,
    sub: str,
    role: str,
    tenant_id: str | None = None,
    ttl_s: int = 3600,
    algorithm: str = "HS256",
    now: float | None = None,
) -> str:
    """Mint a token (operator CLI, service callers, tests). `secret` is the HS256 secret, or a
    PEM private key when `algorithm` is RS256/ES256."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(sorted(ROLES))}")
    if role in TENANT_ROLES and not tenant_id:
        raise ValueError(f"role {role!r} needs a tenant_id")
    if algorithm == "HS256" and len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"the HS256 secret must be at least {MIN_SECRET_BYTES} bytes")
    issued_at = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "role": role, "iat": issued_at, "exp": issued_at + ttl_s}
    if role in TENANT_ROLES:
        claims["tenant_id"] = tenant_id
    return jwt.encode(claims, secret, algorithm=algorithm)


class TokenProvider(Protocol):
    def token(self) -> str: ...


class ServiceTokenProvider:
    """A `service`-role token for calls to other services, renewed well before it expires."""

    def __init__(
        self,
        secret: str,
        sub: str,
        *,
        ttl_s: int = 3600,
        renew_before_s: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if renew_before_s >= ttl_s:
            raise ValueError("renew_before_s must be shorter than ttl_s")
        self._secret, self._sub = secret, sub
        self._ttl_s, self._renew_before_s = ttl_s, renew_before_s
        self._clock = clock
        self._token = ""
        self._renew_at = 0.0

    @classmethod
    def from_env(cls, sub: str) -> ServiceTokenProvider:
        secret = env_optional("SNAPSELL_JWT_SECRET")
        if not secret:
            raise ConfigError("SNAPSELL_JWT_SECRET is required to call other services")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"SNAPSELL_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        return cls(secret, sub)

    def token(self) -> str:
        now = self._clock()
        if now >= self._renew_at:
            self._token = issue_token(
                self._secret, sub=self._sub, role="service", ttl_s=self._ttl_s, now=now
            )
            self._renew_at = now + self._ttl_s - self._renew_before_s
        return self._token


Policy = Mapping[str, frozenset[str]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call and checks the caller's role against `policy`, keyed by full
    method name (`/snapsell.x.v1.XService/Method`). Health and reflection are open; a method
    missing from the policy is refused (fail closed)."""

    def __init__(
        self, verifier: JwtVerifier, policy: Policy, *, service: str | None = None
    ) -> None:
        for method, roles in policy.items():
            if not method.startswith("/") or method.count("/") != 2:
                raise ValueError(f"policy key {method!r} is not a full method name")
            if not roles <= ROLES:
                raise ValueError(f"policy for {method} names unknown roles {set(roles - ROLES)}")
        self._verifier = verifier
        self._policy = dict(policy)
        self._service = service or service_name()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        principal = None
        try:
            principal = self._verifier.verify(
                bearer_token(handler_call_details.invocation_metadata)
            )
            roles = self._policy.get(method)
            if roles is None:
                raise PermissionDeniedError("method has no access policy", "no_policy")
            if principal.role not in roles:
                name = method.rsplit("/", 1)[-1]
                raise PermissionDeniedError(f"role '{principal.role}' may not call {name}", "role")
        except TokenError as error:
            return self._deny(handler, method, grpc.StatusCode.UNAUTHENTICATED, error, principal)
        except PermissionDeniedError as error:
            return self._deny(handler, method, grpc.StatusCode.PERMISSION_DENIED, error, principal)
        # grpc.aio runs the interceptors and then the servicer in the call's own task, so the
        # servicer sees this value and no other call does. (Async servicers only: a sync one
        # runs on a pool thread without it, and current_principal() then refuses.)
        _CURRENT_PRINCIPAL.set(principal)
        return handler

    def _deny(
        self,
        handler: grpc.RpcMethodHandler,
        method: str,
        code: grpc.StatusCode,
        error: TokenError | PermissionDeniedError,
        principal: Principal | None,
    ) -> grpc.RpcMethodHandler:
        AUTH_DENIALS.labels(self._service, method, error.reason).inc()
        fields = {"method": method, "reason": error.reason, "code": code.name, "detail": str(error)}
        if principal is not None:
            fields.update(sub=principal.sub, role=principal.role, tenant_id=principal.tenant_id)
        _log.warning("auth.denied", extra={"fields": fields})
        return aborting_handler(handler, code, str(error))
