"""Enqueue: store new messages, and hand those a sending pipeline of this process has room for
straight to it (direct dispatch), without a NOTIFY, a wake-up or a claim.

Right before the insert, the pipeline reserves room for the messages due now (`reserve`); the
insert stores those granted a slot already claimed by the pipeline's worker
(`OutboxStore.enqueue_and_claim`), and once it has committed they are handed over
(`hand_over`), or the room is given back if it failed (`cancel`). Every other message (due
later, a duplicate, no room) is stored and claimed as usual. Should the process die between
the commit and the hand-over, the messages' lease runs out and any worker claims them like
every expired lease: reconciled with Twilio before any resend, never lost nor sent twice.

The API knows the pipeline only through `DirectDispatch`, passed in by `__main__`; without one
(no pipeline in this process), an enqueue is a plain insert.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

import asyncpg

from infra.db import DATABASE_UNAVAILABLE
from infra.log import get_logger
from services.outbox.domain import ClaimedMessage, NewMessage
from services.outbox.store import OutboxStore

_log = get_logger(__name__)
_DB_ERRORS: tuple[type[Exception], ...] = (*DATABASE_UNAVAILABLE, asyncpg.PostgresError)


class DispatchReservation(Protocol):
    """Room held in a pipeline (`sending.pipeline.DirectReservation`)."""

    @property
    def worker_id(self) -> str: ...

    @property
    def lease_s(self) -> float: ...

    # One flag per (sender, tenant) pair asked about: room was reserved for it.
    @property
    def taken(self) -> Sequence[bool]: ...

    def hand_over(self, claimed: Sequence[ClaimedMessage]) -> bool: ...

    def cancel(self) -> None: ...


class DirectDispatch(Protocol):
    """A sending pipeline running in this process (`sending.pipeline.SendingPipeline`)."""

    def reserve(self, pairs: Sequence[tuple[str, str]]) -> DispatchReservation: ...


# The pipeline running now, if any (a crashed one is replaced by a new one).
CurrentPipeline = Callable[[], DirectDispatch | None]


async def enqueue_messages(
    store: OutboxStore,
    messages: Sequence[NewMessage],
    pipeline: DirectDispatch | None,
    now: datetime,
) -> list[tuple[uuid.UUID, bool]]:
    """Store `messages` (idempotent on tenant + key): (message id, created) of each, in order.
    Those due at `now` that `pipeline` has room for are inserted claimed and handed to it."""
    due = [i for i, m in enumerate(messages) if m.not_before is None or m.not_before <= now]
    if pipeline is None or not due:
        return await store.enqueue_many(messages)
    reservation = pipeline.reserve([(messages[i].sender, messages[i].tenant_id) for i in due])
    take = [False] * len(messages)
    for i, taken in zip(due, reservation.taken, strict=True):
        take[i] = taken
    if not any(take):
        try:
            plain = await store.enqueue_many(messages)
        except BaseException:
            reservation.cancel()
            raise
        reservation.hand_over([])  # after the commit: what it declined is in the table
        return plain
    # A caller gone mid-insert (a deadline, a cancelled RPC) must not strand what the insert
    # may have committed as claimed until its lease runs out: the insert and the hand-over
    # finish whatever becomes of the call.
    insert = asyncio.create_task(_insert_claimed(store, messages, take, reservation))
    _inserting.add(insert)
    insert.add_done_callback(_inserted)
    return await asyncio.shield(insert)


# Inserts whose caller may be gone (a task is only weakly referenced by the event loop).
_inserting: set[asyncio.Task[list[tuple[uuid.UUID, bool]]]] = set()


def _inserted(insert: asyncio.Task[list[tuple[uuid.UUID, bool]]]) -> None:
    _inserting.discard(insert)
    if not insert.cancelled():
        insert.exception()  # its caller has it, if still there; never "not retrieved"


async def _insert_claimed(
    store: OutboxStore,
    messages: Sequence[NewMessage],
    take: Sequence[bool],
    reservation: DispatchReservation,
) -> list[tuple[uuid.UUID, bool]]:
    try:
        stored, claimed = await store.enqueue_and_claim(
            messages, take, reservation.worker_id, reservation.lease_s
        )
    except BaseException:
        reservation.cancel()
        raise
    if not reservation.hand_over(claimed):
        # The pipeline stopped meanwhile: due again at once, for any worker.
        try:
            await store.release(reservation.worker_id, [m.id for m in claimed])
        except _DB_ERRORS as error:  # their lease runs out instead
            _log.warning("outbox.release_failed", extra={"fields": {"error": str(error)}})
    return stored
