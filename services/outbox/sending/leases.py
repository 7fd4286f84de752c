"""What a sender worker holds between claim and result: its claimed messages, whose leases it
keeps alive and whose consent answers it keeps fresh while they wait for a send slot."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from infra.db import DATABASE_UNAVAILABLE
from infra.events import wait_any
from infra.log import get_logger
from services.outbox.clients import ConsentAnswer
from services.outbox.records import ClaimedMessage

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


class ConsentSource(Protocol):
    async def check_consent(
        self, messages: Sequence[ClaimedMessage]
    ) -> Mapping[uuid.UUID, ConsentAnswer]: ...


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


async def refresh_consent(
    held: MutableMapping[uuid.UUID, Held],
    consent: ConsentSource,
    max_age_s: float,
    batch: int,
    stop: asyncio.Event,
) -> None:
    """Ask again, in batches, for the consent of messages still waiting for a slot once their
    answer is half `max_age_s` old: when sends fall behind (a rate limit, a busy machine) the
    answers stay fresh without one call per message at send time."""
    while not stop.is_set():
        await wait_any(stop, timeout_s=max_age_s / 4)
        now = time.monotonic()
        aged = [
            h
            for h in held.values()
            if not h.started
            and not h.lost
            and h.consent is not None
            and now - h.consent.asked_at > max_age_s / 2
        ]
        try:
            for start in range(0, len(aged), batch):
                chunk = aged[start : start + batch]
                answers = await consent.check_consent([h.message for h in chunk])
                for entry in chunk:
                    entry.consent = answers.get(entry.message.id, entry.consent)
        except Exception:  # a bug must not stop the refresh; each send then asks on its own
            _log.exception("outbox.consent_refresh_crashed")
