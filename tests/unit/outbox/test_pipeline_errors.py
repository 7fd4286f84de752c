"""How the sending pipeline settles a send that raised: a database outage is a warning, a bug
an error with its stack trace; either way the message is settled like an unknown outcome."""

from __future__ import annotations

import logging
from typing import Any, cast

import asyncpg
import pytest

from services.outbox.domain import ClaimedMessage, MessageStatus
from services.outbox.sending.consent import ConsentAnswer
from services.outbox.sending.leases import Held
from services.outbox.sending.pipeline import SendingPipeline
from tests.unit.outbox.builders import claimed
from tests.unit.outbox.test_send import CONFIG


class _Store:
    pool: Any = None


class _Raising:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def resolve(self, message: ClaimedMessage, consent: ConsentAnswer | None) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "event", "level"),
    [
        (
            asyncpg.exceptions.ConnectionDoesNotExistError("closed in the middle of operation"),
            "outbox.process_interrupted",
            logging.WARNING,
        ),
        (RuntimeError("a bug"), "outbox.process_failed", logging.ERROR),
    ],
    ids=["database-outage", "bug"],
)
async def test_a_send_that_raised_is_settled_like_an_unknown_outcome(
    error: Exception, event: str, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = SendingPipeline(cast(Any, _Store()), cast(Any, _Raising(error)), CONFIG, "w1")
    held = Held(claimed(), renewed_at=0.0)
    await pipeline._slots.acquire()  # as a lane does before a send
    pipeline._in_flight += 1
    with caplog.at_level(logging.INFO, logger="services.outbox.sending.pipeline"):
        await pipeline._process(held)
    logged = [(r.getMessage(), r.levelno) for r in caplog.records]
    assert logged == [(event, level)]
    [resolution] = pipeline._results._results
    assert resolution.status is MessageStatus.PENDING
    assert resolution.reconcile_since is not None
