"""Signing keys for the local stack, the tests and the benchmarks: one ES256 key per identity
in a directory (`<identity>.pem`, created once) and the trusted key set of their public halves
(`trusted-keys.json`). Each service process is given only its own private key."""

from __future__ import annotations

from pathlib import Path

from infra.auth import MAX_TOKEN_TTL_S, issue_token
from infra.keys import OPERATOR, TRUSTED_KEYS_FILE_NAME, SigningKey, write_key_files

# Every service that calls another over gRPC, and the operator key (admin and tenant tokens).
SERVICE_IDENTITIES = ("routing", "outbox", "live_session", "seller_admin", "live_catalog")
IDENTITIES = (*SERVICE_IDENTITIES, OPERATOR)


class DevKeys:
    def __init__(self, directory: Path, identities: tuple[str, ...] = IDENTITIES) -> None:
        self.directory = directory
        paths = write_key_files(directory, identities)
        self._paths = dict(paths)
        self._keys = {
            kid: SigningKey.from_pem(path.read_bytes(), kid) for kid, path in paths.items()
        }

    @property
    def trusted_keys_file(self) -> Path:
        return self.directory / TRUSTED_KEYS_FILE_NAME

    def key(self, identity: str) -> SigningKey:
        try:
            return self._keys[identity]
        except KeyError:
            raise ValueError(f"no signing key for identity {identity!r}") from None

    def env(self, identity: str) -> dict[str, str]:
        """A process's key settings: the trusted key set, and its own private key if it signs."""
        env = {"SNAPSELL_TRUSTED_KEYS_FILE": str(self.trusted_keys_file)}
        if identity in self._paths:
            env["SNAPSELL_SIGNING_KEY_FILE"] = str(self._paths[identity])
        return env

    def token(
        self,
        role: str,
        tenant_id: str | None = None,
        sub: str = "test",
        audience: str | list[str] | None = None,
        ttl_s: int = MAX_TOKEN_TTL_S,
    ) -> str:
        """A `service` token signed by `sub`'s own key; any other role by the operator key.
        Without `audience`, the token is good for every service."""
        key = self.key(sub if role == "service" else OPERATOR)
        return issue_token(
            key,
            sub=sub,
            role=role,
            tenant_id=tenant_id,
            audience=audience or list(SERVICE_IDENTITIES),
            ttl_s=ttl_s,
        )
