"""Keyset pagination: page sizes and the page tokens of each list (see infra/page_tokens.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from infra.page_tokens import PageTokens
from services.seller_admin.domain import InvalidArgumentError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

# Tenants by id (one list for the whole platform: scope ""), a tenant's channels by
# (created_at, channel_id), its seller phones by address.
TENANT_PAGES = PageTokens("seller_admin.tenants", (str,))
CHANNEL_PAGES = PageTokens("seller_admin.channels", (datetime, uuid.UUID))
SELLER_PHONE_PAGES = PageTokens("seller_admin.seller_phones", (str,))

# Keyset start for channels, ordered by (created_at, channel_id): before any row.
CHANNELS_START = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))


def page_size(requested: int) -> int:
    """0 means the default; larger than the maximum is served as the maximum."""
    if requested < 0:
        raise InvalidArgumentError("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
