"""Page tokens and page sizes for keyset pagination, one format for every list RPC.

A token carries the sort key of the last row a page returned. It is bound to the list it pages
through and to its scope (the tenant listed), so a token from another list or another tenant is
refused, as is one of another version, with a number beyond int64 or negative, or anything else
no response could have carried: `InvalidPageTokenError`, which `infra.grpc_server` returns as
INVALID_ARGUMENT "invalid page_token". Tokens are not secret (a caller may read its own sort
key); the checks keep made-up values away from the database.

Format: unpadded base64url of the compact JSON array `[version, list, scope, *key]`; a datetime
is integer microseconds since the Unix epoch (UTC), a UUID its canonical text.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from infra.grpc_server import InvalidInputError

VERSION = 1
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
INT64_MAX = 2**63 - 1
MAX_TOKEN_CHARS = 1024
MAX_TEXT_CHARS = 512

KeyPart = str | int | datetime | uuid.UUID

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class InvalidPageTokenError(InvalidInputError):
    def __init__(self) -> None:
        super().__init__("invalid page_token")


def page_size(requested: int) -> int:
    """The rows of a page: 0 means the default; more than the maximum is served as the maximum
    (the caller follows the page token); negative is refused (INVALID_ARGUMENT)."""
    if requested < 0:
        raise InvalidInputError("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class PageTokens:
    """The tokens of one list: `list_name` (unique across services) and the types of its sort
    key, in order."""

    list_name: str
    key_types: tuple[type[KeyPart], ...]

    def encode(self, scope: str, *key: KeyPart) -> str:
        if len(key) != len(self.key_types) or not all(
            isinstance(part, kind) for part, kind in zip(key, self.key_types, strict=False)
        ):
            raise TypeError(f"{self.list_name} key must be {self.key_types}, got {key!r}")
        payload = [VERSION, self.list_name, scope, *(_to_json(part) for part in key)]
        raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode(self, token: str, scope: str) -> tuple[Any, ...] | None:
        """The key `encode(scope, ...)` put in `token`; None for an empty token (first page)."""
        if not token:
            return None
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidPageTokenError
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            payload = json.loads(raw)
        except (binascii.Error, ValueError, RecursionError):
            raise InvalidPageTokenError from None
        if (
            not isinstance(payload, list)
            or len(payload) != 3 + len(self.key_types)
            or payload[:3] != [VERSION, self.list_name, scope]
        ):
            raise InvalidPageTokenError
        key = tuple(
            _from_json(kind, part) for kind, part in zip(self.key_types, payload[3:], strict=True)
        )
        # Only the exact text `encode` writes: no padding, stray characters or other spellings.
        if self.encode(scope, *key) != token:
            raise InvalidPageTokenError
        return key


def _to_json(part: KeyPart) -> str | int:
    if isinstance(part, datetime):
        return (part - _EPOCH) // _MICROSECOND
    if isinstance(part, uuid.UUID):
        return str(part)
    return part


def _from_json(kind: type[KeyPart], part: object) -> KeyPart:
    if kind is str:
        if isinstance(part, str) and len(part) <= MAX_TEXT_CHARS and "\0" not in part:
            return part
    elif kind is uuid.UUID:
        if isinstance(part, str):
            try:
                return uuid.UUID(part)
            except ValueError:
                pass
    elif type(part) is int:  # a JSON true/false is not one
        if kind is int and 0 <= part <= INT64_MAX:
            return part
        if kind is datetime:
            try:
                return _EPOCH + part * _MICROSECOND
            except OverflowError:  # outside years 1 to 9999
                pass
    raise InvalidPageTokenError
