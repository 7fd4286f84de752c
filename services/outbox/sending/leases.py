"""What the sending pipeline holds between claim and result: its claimed messages, whose leases
it keeps alive (a lease another worker took over marks its message lost), and their consent
answers (kept fresh by `consent.refresh_consent`) while they wait for a send slot."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from infra.db import DATABASE_UNAVAILABLE
from infra.events import wait_any
from infra.log import get_logger
from services.outbox.domain import ClaimedMessage
from services.outbox.sending.consent import ConsentAnswer

_log = get_logger(__name__)
_DB_ERRORS: tuple[type[Exception], ...] = (*DATABASE_UNAVAILABLE, asyncpg.PostgresError)


@dataclass(slots=True)
class Held:
    message: ClaimedMessage
    renewed_at: float
    consent: ConsentAnswer | None = None
    started: bool = False
    lost: bool = False


class LeaseStore(Protocol):
    async def renew_leases(
        self, worker_id: str, ids: Sequence[uuid.UUID], lease_s: float
    ) -> set[uuid.UUID]: ...


async def renew_leases(
    held: MutableMapping[uuid.UUID, Held],
    store: LeaseStore,
    worker_id: str,
    lease_s: float,
    stop: asyncio.Event,
) -> None:
    """Every quarter lease, extend the leases of what is held; a lease another worker took
    over marks its message lost (never written over)."""
    interval = lease_s / 4
    while not stop.is_set():
        await wait_any(stop, timeout_s=interval)
        now = time.monotonic()
        due = [i for i, h in held.items() if now - h.renewed_at >= interval and not h.lost]
        if not due:
            continue
        try:
            kept = await store.renew_leases(worker_id, due, lease_s)
        except _DB_ERRORS as error:
            _log.warning("outbox.renew_failed", extra={"fields": {"error": str(error)}})
            continue
        for message_id in due:
            entry = held.get(message_id)
            if entry is None:
                continue
            if message_id in kept:
                entry.renewed_at = now
            else:
                entry.lost = True
