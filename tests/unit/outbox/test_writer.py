"""The result writer keeps a batch whose write the database interrupted and writes it again,
instead of dropping it (a dropped result costs the message a lease expiry and an attempt)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import asyncpg
import pytest

from services.outbox.domain import MessageStatus, Resolution
from services.outbox.sending.writer import ResultWriter


class InterruptedStore:
    """Fails the first `failures` writes with `failure` (an outage that lasts a moment), then
    writes everything it is given."""

    def __init__(self, failure: Exception, failures: int) -> None:
        self.failure = failure
        self.failures = failures
        self.writes = 0

    async def record_resolutions(
        self, worker_id: str, resolutions: Sequence[Resolution]
    ) -> set[uuid.UUID]:
        self.writes += 1
        if self.writes <= self.failures:
            raise self.failure
        return {resolution.message_id for resolution in resolutions}


def _writer(store: InterruptedStore, written: list[set[uuid.UUID]]) -> ResultWriter:
    """A writer that flushes at once and appends each batch's written ids to `written`."""
    return ResultWriter(
        store,  # type: ignore[arg-type]
        "worker-1",
        batch_size=10,
        flush_interval_s=0.0,
        on_written=lambda _batch, ids: written.append(ids),
    )


@pytest.mark.parametrize(
    "failure",
    [
        # What asyncpg raises when `pg_terminate_backend` ends the session mid-statement.
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionRefusedError(111, "Connection refused"),
    ],
)
async def test_a_write_cut_off_by_the_database_is_written_again(failure: Exception) -> None:
    store = InterruptedStore(failure, failures=3)
    written: list[set[uuid.UUID]] = []
    writer = _writer(store, written)
    result = Resolution(uuid.uuid4(), "shop", MessageStatus.SENT, twilio_sid="SM1")
    running = asyncio.create_task(writer.run())
    writer.add(result)
    async with asyncio.timeout(10):
        while not written:
            await asyncio.sleep(0.01)
    writer.finish()
    await asyncio.wait_for(running, 10)
    assert written == [{result.message_id}]
    assert store.writes == 4


async def test_results_left_when_finishing_are_written_and_the_writer_returns_at_once() -> None:
    store = InterruptedStore(RuntimeError("never raised"), failures=0)
    written: list[set[uuid.UUID]] = []
    writer = _writer(store, written)
    running = asyncio.create_task(writer.run())
    await asyncio.sleep(0)  # waiting for a result
    result = Resolution(uuid.uuid4(), "shop", MessageStatus.SENT, twilio_sid="SM1")
    # A send that ended as the pipeline stops: its result comes with the call to finish.
    writer.add(result)
    writer.finish()
    await asyncio.wait_for(running, 1)
    assert written == [{result.message_id}]
