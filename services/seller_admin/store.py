"""All SQL of seller_admin (asyncpg). Functions take a connection so the caller decides the
transaction; they return domain objects and never decide who may do what."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from infra.db import Connection
from services.seller_admin.domain import (
    AlreadyExistsError,
    Channel,
    ChannelAddress,
    ChannelKind,
    NotFoundError,
    ResolvedSender,
    SellerAddress,
    SellerPhone,
    SellerPhoneKind,
    SenderRole,
    Tenant,
)

# An add that conflicts with a row deleted before we could read it is retried this many times.
_ADD_ATTEMPTS = 3

_TENANT_COLUMNS = "tenant_id, display_name, created_at"
_CHANNEL_COLUMNS = (
    "channel_id, tenant_id, kind, address, messaging_service_sid, account_sid, created_at,"
    " alphanumeric_sender_id"
)
_SELLER_PHONE_COLUMNS = "seller_phone_id, tenant_id, kind, address, created_at"


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(row["tenant_id"], row["display_name"], row["created_at"])


def _channel(row: asyncpg.Record) -> Channel:
    kind = ChannelKind(row["kind"])
    if kind is ChannelKind.MESSAGING_SERVICE:
        value = row["messaging_service_sid"]
    else:
        # Stored in Twilio's form (`whatsapp:+1...`); the domain keeps the bare number.
        value = row["address"].rpartition(":")[2]
    return Channel(
        channel_id=row["channel_id"],
        tenant_id=row["tenant_id"],
        address=ChannelAddress(kind, value),
        account_sid=row["account_sid"],
        created_at=row["created_at"],
        alphanumeric_sender_id=row["alphanumeric_sender_id"],
    )


def _seller_phone(row: asyncpg.Record) -> SellerPhone:
    return SellerPhone(
        seller_phone_id=row["seller_phone_id"],
        tenant_id=row["tenant_id"],
        address=SellerAddress(SellerPhoneKind(row["kind"]), row["address"]),
        created_at=row["created_at"],
    )


# --- Tenants ----------------------------------------------------------------------------------


async def add_tenant(conn: Connection, tenant_id: str, display_name: str) -> tuple[Tenant, bool]:
    """The tenant and whether this call created it (False: it existed, returned unchanged)."""
    for _ in range(_ADD_ATTEMPTS):
        row = await conn.fetchrow(
            f"INSERT INTO tenants (tenant_id, display_name) VALUES ($1, $2)"
            f" ON CONFLICT ON CONSTRAINT tenants_pkey DO NOTHING RETURNING {_TENANT_COLUMNS}",
            tenant_id,
            display_name,
        )
        if row is not None:
            return _tenant(row), True
        existing = await get_tenant(conn, tenant_id)
        if existing is not None:
            return existing, False
    raise RuntimeError(f"tenant {tenant_id} kept changing while being added")


async def get_tenant(conn: Connection, tenant_id: str) -> Tenant | None:
    row = await conn.fetchrow(
        f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE tenant_id = $1", tenant_id
    )
    return None if row is None else _tenant(row)


async def tenant_exists(conn: Connection, tenant_id: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM tenants WHERE tenant_id = $1", tenant_id))


async def list_tenants(conn: Connection, *, after: str, limit: int) -> list[Tenant]:
    """Tenants ordered by id, those after `after` ("" for the first page)."""
    rows = await conn.fetch(
        f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE tenant_id > $1 ORDER BY tenant_id LIMIT $2",
        after,
        limit,
    )
    return [_tenant(row) for row in rows]


# --- Channels ---------------------------------------------------------------------------------


async def add_channel(
    conn: Connection,
    tenant_id: str,
    address: ChannelAddress,
    account_sid: str,
    alphanumeric_sender_id: str | None = None,
) -> tuple[Channel, bool]:
    """The new channel and True, or the channel already holding this address (possibly of
    another tenant: the caller decides) and False. AlreadyExistsError when another channel
    holds the alphanumeric sender ID."""
    is_service = address.kind is ChannelKind.MESSAGING_SERVICE
    for _ in range(_ADD_ATTEMPTS):
        try:
            row = await conn.fetchrow(
                f"INSERT INTO channels"
                f" (channel_id, tenant_id, kind, address, messaging_service_sid, account_sid,"
                f" alphanumeric_sender_id)"
                f" VALUES ($1, $2, $3, $4, $5, $6, $7)"
                f" ON CONFLICT DO NOTHING RETURNING {_CHANNEL_COLUMNS}",
                uuid.uuid4(),
                tenant_id,
                address.kind.value,
                None if is_service else address.canonical,
                address.value if is_service else None,
                account_sid,
                alphanumeric_sender_id,
            )
        except asyncpg.ForeignKeyViolationError:
            raise NotFoundError(f"tenant {tenant_id} does not exist") from None
        if row is not None:
            return _channel(row), True
        existing = await find_channel(conn, address)
        if existing is not None:
            return existing, False
        if alphanumeric_sender_id is not None and await conn.fetchval(
            "SELECT 1 FROM channels WHERE upper(alphanumeric_sender_id) = upper($1)",
            alphanumeric_sender_id,
        ):
            raise AlreadyExistsError(
                f"alphanumeric sender ID {alphanumeric_sender_id} belongs to another channel"
            )
    raise RuntimeError(f"channel {address.canonical} kept changing while being added")


async def find_channel(conn: Connection, address: ChannelAddress) -> Channel | None:
    row = await conn.fetchrow(
        f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE address = $1 OR messaging_service_sid = $1",
        address.canonical,
    )
    return None if row is None else _channel(row)


async def remove_channel(
    conn: Connection, tenant_id: str, address: ChannelAddress
) -> Channel | None:
    """The removed channel, None when this tenant has no such channel."""
    row = await conn.fetchrow(
        f"DELETE FROM channels WHERE tenant_id = $1"
        f" AND (address = $2 OR messaging_service_sid = $2) RETURNING {_CHANNEL_COLUMNS}",
        tenant_id,
        address.canonical,
    )
    return None if row is None else _channel(row)


async def list_channels(
    conn: Connection, tenant_id: str, *, after: tuple[datetime, uuid.UUID], limit: int
) -> list[Channel]:
    """A tenant's channels in the order they were added, those after the key `after`."""
    rows = await conn.fetch(
        f"SELECT {_CHANNEL_COLUMNS} FROM channels"
        f" WHERE tenant_id = $1 AND (created_at, channel_id) > ($2, $3)"
        f" ORDER BY created_at, channel_id LIMIT $4",
        tenant_id,
        after[0],
        after[1],
        limit,
    )
    return [_channel(row) for row in rows]


# --- Seller phones ----------------------------------------------------------------------------


async def add_seller_phone(
    conn: Connection, tenant_id: str, address: SellerAddress
) -> tuple[SellerPhone, bool]:
    """The entry and whether this call created it."""
    for _ in range(_ADD_ATTEMPTS):
        try:
            row = await conn.fetchrow(
                f"INSERT INTO seller_phones (seller_phone_id, tenant_id, kind, address)"
                f" VALUES ($1, $2, $3, $4)"
                f" ON CONFLICT ON CONSTRAINT seller_phones_tenant_address_key DO NOTHING"
                f" RETURNING {_SELLER_PHONE_COLUMNS}",
                uuid.uuid4(),
                tenant_id,
                address.kind.value,
                address.value,
            )
        except asyncpg.ForeignKeyViolationError:
            raise NotFoundError(f"tenant {tenant_id} does not exist") from None
        if row is not None:
            return _seller_phone(row), True
        row = await conn.fetchrow(
            f"SELECT {_SELLER_PHONE_COLUMNS} FROM seller_phones"
            f" WHERE tenant_id = $1 AND address = $2",
            tenant_id,
            address.value,
        )
        if row is not None:
            return _seller_phone(row), False
    raise RuntimeError("seller phone kept changing while being added")


async def remove_seller_phone(
    conn: Connection, tenant_id: str, address: SellerAddress
) -> SellerPhone | None:
    row = await conn.fetchrow(
        f"DELETE FROM seller_phones WHERE tenant_id = $1 AND address = $2"
        f" RETURNING {_SELLER_PHONE_COLUMNS}",
        tenant_id,
        address.value,
    )
    return None if row is None else _seller_phone(row)


# Keyset paging on seller_phones_tenant_address_key.
_LIST_SELLER_PHONES = (
    f"SELECT {_SELLER_PHONE_COLUMNS} FROM seller_phones"
    f" WHERE tenant_id = $1 AND address > $2 ORDER BY address LIMIT $3"
)


async def list_seller_phones(
    conn: Connection, tenant_id: str, *, after: str, limit: int
) -> list[SellerPhone]:
    """A tenant's seller phones ordered by address, those after `after` ("" for the first)."""
    rows = await conn.fetch(_LIST_SELLER_PHONES, tenant_id, after, limit)
    return [_seller_phone(row) for row in rows]


# --- Sender resolution ------------------------------------------------------------------------

# One round trip on unique indexes: the Messaging Service match wins over the number match
# (numbers in a Messaging Service pool are registered through the service), then the sender
# is looked up among that tenant's seller phones.
_RESOLVE_SENDER = """
WITH channel AS (
    SELECT tenant_id, channel_id FROM (
        SELECT tenant_id, channel_id, 0 AS priority FROM channels
        WHERE messaging_service_sid = $1 AND account_sid = $3
        UNION ALL
        SELECT tenant_id, channel_id, 1 AS priority FROM channels
        WHERE address = $2 AND account_sid = $3
    ) AS candidates
    ORDER BY priority
    LIMIT 1
)
SELECT channel.tenant_id, channel.channel_id, EXISTS (
    SELECT 1 FROM seller_phones
    WHERE seller_phones.tenant_id = channel.tenant_id AND seller_phones.address = ANY($4::text[])
) AS is_seller
FROM channel
"""


async def resolve_sender(
    conn: Connection | asyncpg.Pool,
    *,
    messaging_service_sid: str,
    recipient: str,
    account_sid: str,
    sender_candidates: list[str],
) -> ResolvedSender | None:
    """None when no channel matches. `recipient` is in Twilio's form (`whatsapp:+1...`);
    `sender_candidates` are the sender's number and/or WhatsApp user ID."""
    row = await conn.fetchrow(
        _RESOLVE_SENDER, messaging_service_sid, recipient, account_sid, sender_candidates
    )
    if row is None:
        return None
    role = SenderRole.SELLER if row["is_seller"] else SenderRole.CLIENT
    return ResolvedSender(row["tenant_id"], row["channel_id"], role)
