"""JWT authentication and per-caller access control for gRPC services.

Callers send `authorization: Bearer <JWT>`. No key is shared: every identity signs with its own
ES256 key (`infra.keys`), and verifiers hold the public keys of the identities they trust
(`SNAPSELL_TRUSTED_KEYS_FILE`). The token's `kid` picks the key, and the key's identity bounds
what it may sign: a service key only `role=service` tokens whose `sub` is that service, the
`operator` key only admin and tenant-role tokens. Tokens of an external identity provider are
verified with its own key set (`SNAPSELL_IDP_KEYS_FILE`) and must carry its `iss` and our
audience. The algorithm is pinned by the key, never chosen by the token.

Every token must carry `sub`, `role`, `iat`, `exp`, `aud` (our own tokens: the callee service;
IdP tokens: `SNAPSELL_IDP_AUDIENCE`) and `iss`; `tenant_id` for tenant roles; and live no
longer than its role's maximum (`exp - iat`).

Errors: `TokenError` (-> UNAUTHENTICATED) and `PermissionDeniedError` (-> PERMISSION_DENIED),
both with a one-line message safe to return to the caller.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import jwt
from prometheus_client import Counter

from infra.config import ConfigError, env_int, env_optional
from infra.grpc_server import OPEN_METHOD_PREFIXES, aborting_handler
from infra.keys import OPERATOR, SIGNING_ALGORITHM, KeySetFile, SigningKey, VerificationKey
from infra.log import get_logger, service_name

ROLES = frozenset({"admin", "owner", "manager", "staff", "service"})
TENANT_ROLES = frozenset({"owner", "manager", "staff"})
HUMAN_ROLES = ROLES - {"service"}
# `iss` of the tokens our own keys sign (services and operators).
ISSUER = "snapsell"
LEEWAY_S = 30
# Longest `exp - iat` accepted: a leaked token is worth little for long.
MAX_TOKEN_TTL_S = 3600
# Tenant-role tokens may live longer (an IdP session), never beyond this cap.
TENANT_TOKEN_TTL_CAP_S = 24 * 3600
_MAX_TOKEN_CHARS = 8192
_CACHE_SIZE = 4096
_INTERNAL_ALGORITHMS = frozenset({SIGNING_ALGORITHM})
_IDP_ALGORITHMS = frozenset({"RS256", "ES256"})
_REQUIRED_CLAIMS = ["sub", "role", "iat", "exp", "aud", "iss"]


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
_log = get_logger(__name__)
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


def _check_signer(key: VerificationKey, principal: Principal) -> None:
    """A service key speaks only for its own service; the operator key never for a service."""
    if key.identity == OPERATOR:
        if principal.role == "service":
            raise TokenError("operator keys may not sign service tokens", "wrong_identity")
    elif principal.role != "service" or principal.sub != key.identity:
        raise TokenError(
            f"key '{key.kid}' may only sign service tokens for '{key.identity}'", "wrong_identity"
        )


_DECODE_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token expired", "expired"),
    (jwt.ImmatureSignatureError, "token not valid yet", "not_yet_valid"),
    (jwt.InvalidSignatureError, "token signature invalid", "bad_signature"),
    (jwt.InvalidAlgorithmError, "token algorithm not accepted", "bad_algorithm"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim", "bad_claims"),
    (jwt.InvalidAudienceError, "token audience not accepted", "bad_audience"),
    (jwt.InvalidIssuerError, "token issuer not accepted", "bad_issuer"),
    (jwt.InvalidIssuedAtError, "token 'iat' claim must be an integer", "bad_claims"),
    (jwt.DecodeError, "malformed token", "malformed"),
)


@dataclass(frozen=True, slots=True)
class IdentityProvider:
    """An external identity provider whose tokens we accept: its key set, `iss`, and the
    audience it puts in tokens meant for this API."""

    keys: KeySetFile
    issuer: str
    audience: str

    @classmethod
    def from_env(cls) -> IdentityProvider | None:
        if env_optional("SNAPSELL_JWT_PUBLIC_KEY"):
            raise ConfigError(
                "SNAPSELL_JWT_PUBLIC_KEY is no longer read: publish the identity provider's "
                "keys as a JWKS file in SNAPSELL_IDP_KEYS_FILE"
            )
        path = env_optional("SNAPSELL_IDP_KEYS_FILE")
        issuer = env_optional("SNAPSELL_IDP_ISSUER")
        audience = env_optional("SNAPSELL_IDP_AUDIENCE")
        if path is None:
            if issuer or audience:
                raise ConfigError("SNAPSELL_IDP_ISSUER/AUDIENCE need SNAPSELL_IDP_KEYS_FILE")
            return None
        if not issuer or not audience:
            raise ConfigError("SNAPSELL_IDP_KEYS_FILE needs SNAPSELL_IDP_ISSUER and _AUDIENCE")
        keys = KeySetFile(path, setting="SNAPSELL_IDP_KEYS_FILE", algorithms=_IDP_ALGORITHMS)
        return cls(keys, issuer, audience)


class JwtVerifier:
    """Verifies bearer tokens meant for `audience` (this service's name); results are cached per
    token string until the token expires."""

    def __init__(
        self,
        *,
        audience: str,
        trusted_keys: KeySetFile | None = None,
        identity_provider: IdentityProvider | None = None,
        tenant_max_ttl_s: int = MAX_TOKEN_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if trusted_keys is None and identity_provider is None:
            raise ConfigError("set SNAPSELL_TRUSTED_KEYS_FILE or SNAPSELL_IDP_KEYS_FILE")
        if not 0 < tenant_max_ttl_s <= TENANT_TOKEN_TTL_CAP_S:
            raise ConfigError(f"tenant token lifetime must be 1..{TENANT_TOKEN_TTL_CAP_S} s")
        if trusted_keys and identity_provider:
            shared = trusted_keys.keys.keys() & identity_provider.keys.keys.keys()
            if shared:
                raise ConfigError(f"key ids {sorted(shared)} are both ours and the IdP's")
        self._audience = audience
        self._trusted = trusted_keys
        self._idp = identity_provider
        self._max_ttl_s = {role: MAX_TOKEN_TTL_S for role in ROLES} | {
            role: tenant_max_ttl_s for role in TENANT_ROLES
        }
        self._clock = clock
        self._jwt = jwt.PyJWT()
        # Service tokens are reused for most of an hour; re-verifying the signature on every
        # call would be most of the interceptor's cost.
        self._cache: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def from_env(cls, audience: str) -> JwtVerifier:
        if env_optional("SNAPSELL_JWT_SECRET"):
            raise ConfigError(
                "SNAPSELL_JWT_SECRET is no longer read: services verify with the public keys "
                "in SNAPSELL_TRUSTED_KEYS_FILE"
            )
        path = env_optional("SNAPSELL_TRUSTED_KEYS_FILE")
        trusted = (
            KeySetFile(path, setting="SNAPSELL_TRUSTED_KEYS_FILE", algorithms=_INTERNAL_ALGORITHMS)
            if path
            else None
        )
        return cls(
            audience=audience,
            trusted_keys=trusted,
            identity_provider=IdentityProvider.from_env(),
            tenant_max_ttl_s=env_int(
                "SNAPSELL_TENANT_TOKEN_MAX_TTL_S",
                MAX_TOKEN_TTL_S,
                minimum=60,
                maximum=TENANT_TOKEN_TTL_CAP_S,
            ),
        )

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

    def _key(self, kid: object) -> tuple[VerificationKey, IdentityProvider | None]:
        """The key `kid` names and, for an IdP key, its provider; reloads rotated key sets."""
        if isinstance(kid, str) and kid:
            for _attempt in range(2):
                if self._trusted is not None and kid in self._trusted.keys:
                    return self._trusted.keys[kid], None
                if self._idp is not None and kid in self._idp.keys.keys:
                    return self._idp.keys.keys[kid], self._idp
                reloaded = [
                    keys.reload_if_changed()
                    for keys in (self._trusted, self._idp.keys if self._idp is not None else None)
                    if keys is not None
                ]
                if not any(reloaded):
                    break
        raise TokenError("token key id not recognised", "unknown_kid")

    def _decode(self, token: str) -> tuple[Principal, float]:
        if not token or len(token) > _MAX_TOKEN_CHARS:
            raise TokenError("malformed token", "malformed")
        try:
            key, provider = self._key(jwt.get_unverified_header(token).get("kid"))
            claims = self._jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=provider.audience if provider else self._audience,
                issuer=provider.issuer if provider else ISSUER,
                leeway=LEEWAY_S,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.InvalidTokenError as error:
            for error_type, message, reason in _DECODE_ERRORS:
                if isinstance(error, error_type):
                    raise TokenError(message, reason) from None
            raise TokenError("invalid token", "invalid") from None
        principal = _principal_from_claims(claims)
        if provider is None:
            _check_signer(key, principal)
        elif principal.role == "service":
            raise TokenError("service tokens come only from service keys", "wrong_identity")
        exp = float(claims["exp"])
        if exp - float(claims["iat"]) > self._max_ttl_s[principal.role]:
            limit = self._max_ttl_s[principal.role]
            raise TokenError(f"token lifetime exceeds {limit} s for its role", "too_long")
        return principal, exp


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
    signing_key: SigningKey,
    *,
    sub: str,
    role: str,
    audience: str | list[str],
    tenant_id: str | None = None,
    ttl_s: int = MAX_TOKEN_TTL_S,
    now: float | None = None,
) -> str:
    """Mint a token for `audience` (the callee service) signed with `signing_key`: a service's
    own key for its `service` token, the operator key for admin and tenant-role tokens."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(sorted(ROLES))}")
    if role in TENANT_ROLES and not tenant_id:
        raise ValueError(f"role {role!r} needs a tenant_id")
    if signing_key.identity == OPERATOR:
        if role == "service":
            raise ValueError("the operator key may not sign service tokens")
    elif role != "service" or sub != signing_key.identity:
        raise ValueError(f"the {signing_key.identity!r} key signs only its own service tokens")
    issued_at = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": sub,
        "aud": audience,
        "role": role,
        "iat": issued_at,
        "exp": issued_at + ttl_s,
    }
    if role in TENANT_ROLES:
        claims["tenant_id"] = tenant_id
    return jwt.encode(
        claims,
        signing_key.private_key,
        algorithm=SIGNING_ALGORITHM,
        headers={"kid": signing_key.kid},
    )


class TokenProvider(Protocol):
    def token(self) -> str: ...


class ServiceTokenProvider:
    """This service's token for calls to one peer (`audience`), renewed well before it
    expires."""

    def __init__(
        self,
        signing_key: SigningKey,
        audience: str,
        *,
        ttl_s: int = MAX_TOKEN_TTL_S,
        renew_before_s: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if renew_before_s >= ttl_s:
            raise ValueError("renew_before_s must be shorter than ttl_s")
        self._key, self._audience = signing_key, audience
        self._ttl_s, self._renew_before_s = ttl_s, renew_before_s
        self._clock = clock
        self._token = ""
        self._renew_at = 0.0

    @classmethod
    def from_env(cls, identity: str, audience: str) -> ServiceTokenProvider:
        return cls(SigningKey.from_env(identity), audience)

    def token(self) -> str:
        now = self._clock()
        if now >= self._renew_at:
            self._token = issue_token(
                self._key,
                sub=self._key.identity,
                role="service",
                audience=self._audience,
                ttl_s=self._ttl_s,
                now=now,
            )
            self._renew_at = now + self._ttl_s - self._renew_before_s
        return self._token


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call one RPC: human roles (admin and tenant roles) and, by name, the services."""

    roles: frozenset[str] = frozenset()
    services: frozenset[str] = frozenset()


Policy = Mapping[str, Access]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call and checks the caller against `policy`, keyed by full method
    name (`/snapsell.x.v1.XService/Method`): a human role must be among the method's roles, a
    service among its services. Health and reflection are open; a method missing from the
    policy is refused (fail closed)."""

    def __init__(
        self, verifier: JwtVerifier, policy: Policy, *, service: str | None = None
    ) -> None:
        for method, access in policy.items():
            if not method.startswith("/") or method.count("/") != 2:
                raise ValueError(f"policy key {method!r} is not a full method name")
            if not isinstance(access, Access):
                raise ValueError(f"policy for {method} must be an Access")
            if not access.roles <= HUMAN_ROLES:
                unknown = set(access.roles - HUMAN_ROLES)
                raise ValueError(f"policy for {method} names unknown roles {unknown}")
        self._verifier = verifier
        self._policy = dict(policy)
        self._service = service or service_name()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        principal = None
        try:
            principal = self._verifier.verify(
                bearer_token(handler_call_details.invocation_metadata)
            )
            access = self._policy.get(method)
            if access is None:
                raise PermissionDeniedError("method has no access policy", "no_policy")
            if principal.role == "service":
                if principal.sub not in access.services:
                    name = method.rsplit("/", 1)[-1]
                    raise PermissionDeniedError(
                        f"service '{principal.sub}' may not call {name}", "caller"
                    )
            elif principal.role not in access.roles:
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
        handler: grpc.RpcMethodHandler[Any, Any],
        method: str,
        code: grpc.StatusCode,
        error: TokenError | PermissionDeniedError,
        principal: Principal | None,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        AUTH_DENIALS.labels(self._service, method, error.reason).inc()
        fields: dict[str, str | None] = {
            "method": method,
            "reason": error.reason,
            "code": code.name,
            "detail": str(error),
        }
        if principal is not None:
            fields.update(sub=principal.sub, role=principal.role, tenant_id=principal.tenant_id)
        _log.warning("auth.denied", extra={"fields": fields})
        return aborting_handler(handler, code, str(error))
