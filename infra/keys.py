"""Signing keys and trusted key sets for bearer tokens.

Every identity that signs tokens (each service, and operators) holds its own ES256 (P-256)
private key; verifiers hold only public keys, as a JWKS document whose `kid`s name the identity
that owns each key: `<identity>` or `<identity>.<version>` during a rotation (`routing`,
`routing.2027-01`, `operator`, `operator.alice`). The identity is what a key may speak for (see
`infra.auth`). External identity provider keys come in a JWKS of their own.

A key set file is re-read when a token names a `kid` it does not know and the file changed since
(a rotated Kubernetes ConfigMap), at most once per `RELOAD_INTERVAL_S`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from infra.config import ConfigError

SIGNING_ALGORITHM = "ES256"
OPERATOR = "operator"
RELOAD_INTERVAL_S = 10.0
TRUSTED_KEYS_FILE_NAME = "trusted-keys.json"
_MIN_RSA_BITS = 2048


def key_identity(kid: str) -> str:
    """The identity a key id names: `routing.2027-01` -> `routing`."""
    return kid.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    algorithm: str
    key: Any

    @property
    def identity(self) -> str:
        return key_identity(self.kid)


def parse_key_set(
    document: str, *, source: str, algorithms: frozenset[str]
) -> dict[str, VerificationKey]:
    """`kid` -> VerificationKey from a JWKS document; ConfigError naming `source` if any key is
    unusable (a bad key is a deployment mistake to see at once, not a key to skip)."""
    try:
        entries = json.loads(document)["keys"]
        if not isinstance(entries, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{source} is not a JWKS document ({{'keys': [...]}})") from None
    keys: dict[str, VerificationKey] = {}
    for entry in entries:
        kid = entry.get("kid") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or not kid:
            raise ConfigError(f"{source}: every key needs a 'kid'")
        if kid in keys:
            raise ConfigError(f"{source}: key id {kid!r} appears twice")
        if "d" in entry:
            raise ConfigError(f"{source}: key {kid!r} is a private key; publish the public part")
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            raise ConfigError(f"{source}: key {kid!r} is not a usable JWK") from None
        if jwk.algorithm_name not in algorithms:
            raise ConfigError(
                f"{source}: key {kid!r} uses {jwk.algorithm_name}; "
                f"expected {' or '.join(sorted(algorithms))}"
            )
        if isinstance(jwk.key, rsa.RSAPublicKey) and jwk.key.key_size < _MIN_RSA_BITS:
            raise ConfigError(f"{source}: RSA key {kid!r} is shorter than {_MIN_RSA_BITS} bits")
        keys[kid] = VerificationKey(kid, jwk.algorithm_name, jwk.key)
    return keys


class KeySetFile:
    """A JWKS file, re-read on demand when it changed (see the module docstring)."""

    def __init__(self, path: str, *, setting: str, algorithms: frozenset[str]) -> None:
        self._path = Path(path)
        self._setting = setting
        self._algorithms = algorithms
        self._mtime = self._stat()
        self.keys: dict[str, VerificationKey] = self._read()
        self._checked_at = time.monotonic()

    def _stat(self) -> float:
        try:
            return self._path.stat().st_mtime
        except OSError:
            raise ConfigError(f"{self._setting}: cannot read {self._path}") from None

    def _read(self) -> dict[str, VerificationKey]:
        return parse_key_set(
            self._path.read_text(),
            source=f"{self._setting} ({self._path})",
            algorithms=self._algorithms,
        )

    def reload_if_changed(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at < RELOAD_INTERVAL_S:
            return False
        self._checked_at = now
        try:
            mtime = self._stat()
            if mtime == self._mtime:
                return False
            keys = self._read()
        except (ConfigError, OSError):
            return False  # a half-written file: keep the keys we have, try again later
        self.keys, self._mtime = keys, mtime
        return True


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An identity's own private key and the `kid` its public key is published under."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey

    @property
    def identity(self) -> str:
        return key_identity(self.kid)

    @classmethod
    def from_pem(cls, pem: str | bytes, kid: str) -> SigningKey:
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ConfigError("the signing key is not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ConfigError("the signing key must be a P-256 (ES256) EC private key")
        return cls(kid, key)

    @classmethod
    def from_env(cls, identity: str) -> SigningKey:
        """This identity's key: `SNAPSELL_SIGNING_KEY_FILE` (PEM), published as
        `SNAPSELL_SIGNING_KEY_ID` (default: the identity itself)."""
        path = os.environ.get("SNAPSELL_SIGNING_KEY_FILE", "").strip()
        if not path:
            raise ConfigError(f"SNAPSELL_SIGNING_KEY_FILE is required to sign as {identity!r}")
        kid = os.environ.get("SNAPSELL_SIGNING_KEY_ID", "").strip() or identity
        if key_identity(kid) != identity:
            raise ConfigError(f"SNAPSELL_SIGNING_KEY_ID {kid!r} does not name {identity!r}")
        try:
            pem = Path(path).read_bytes()
        except OSError:
            raise ConfigError(f"SNAPSELL_SIGNING_KEY_FILE: cannot read {path}") from None
        return cls.from_pem(pem, kid)

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private_key))
        public = {name: jwk[name] for name in ("kty", "crv", "x", "y")}
        return public | {"kid": self.kid, "alg": SIGNING_ALGORITHM, "use": "sig"}


def new_signing_key(kid: str) -> SigningKey:
    return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()))


def key_set_document(keys: Iterable[SigningKey]) -> str:
    """The JWKS of the public halves of `keys`, for `SNAPSELL_TRUSTED_KEYS_FILE`."""
    return json.dumps({"keys": [key.public_jwk() for key in keys]}, indent=2)


def write_key_files(directory: Path, kids: Iterable[str]) -> Mapping[str, Path]:
    """Local stacks and tests: `<kid>.pem` per identity (created once, mode 0600) and
    `trusted-keys.json` with their public keys. Returns kid -> private key path."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    keys: list[SigningKey] = []
    for kid in kids:
        path = directory / f"{kid}.pem"
        if path.exists():
            key = SigningKey.from_pem(path.read_bytes(), kid)
        else:
            key = new_signing_key(kid)
            path.touch(mode=0o600)
            path.write_bytes(key.private_pem())
        keys.append(key)
        paths[kid] = path
    (directory / TRUSTED_KEYS_FILE_NAME).write_text(key_set_document(keys))
    return paths
