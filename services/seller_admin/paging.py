"""Keyset pagination: page sizes and opaque page tokens carrying the last row's sort key."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime

from services.seller_admin.domain import Channel, InvalidArgumentError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_PAGE_TOKEN_VERSION = "v1"


def page_size(requested: int) -> int:
    """0 means the default; larger than the maximum is served as the maximum."""
    if requested < 0:
        raise InvalidArgumentError("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(*key: str) -> str:
    """An opaque token for keyset pagination: the sort key of the last row returned."""
    payload = json.dumps([_PAGE_TOKEN_VERSION, *key], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str, parts: int) -> tuple[str, ...] | None:
    """The key encoded by `encode_page_token`, None for the first page."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        decoded = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidArgumentError("page_token is not valid") from None
    if (
        not isinstance(decoded, list)
        or len(decoded) != parts + 1
        or decoded[0] != _PAGE_TOKEN_VERSION
        or not all(isinstance(part, str) for part in decoded[1:])
    ):
        raise InvalidArgumentError("page_token is not valid")
    return tuple(decoded[1:])


# Keyset start for channels, ordered by (created_at, channel_id): before any row.
CHANNELS_START = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))


def encode_channel_page_token(channel: Channel) -> str:
    return encode_page_token(channel.created_at.isoformat(), str(channel.channel_id))


def decode_channel_page_token(token: str) -> tuple[datetime, uuid.UUID]:
    key = decode_page_token(token, 2)
    if key is None:
        return CHANNELS_START
    try:
        created_at, channel_id = datetime.fromisoformat(key[0]), uuid.UUID(key[1])
    except ValueError:
        raise InvalidArgumentError("page_token is not valid") from None
    if created_at.tzinfo is None:
        raise InvalidArgumentError("page_token is not valid")
    return created_at, channel_id
