"""The sending pipeline's side of direct dispatch: how much room an enqueue may reserve, what
is refused (a saturated (sender, tenant) pair, a known backlog, a stopping pipeline), and how
a reservation is settled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, cast

import pytest

from services.outbox.domain import ClaimedMessage
from services.outbox.sending.consent import ConsentAnswer
from services.outbox.sending.pipeline import SendingPipeline
from tests.unit.outbox.builders import claimed
from tests.unit.outbox.test_send import CONFIG

SHOP = ("+14155550100", "shop-a")
OTHER = ("+14155550100", "shop-b")


class _Store:
    pool: Any = None


class _Delivery:
    """Consent never answers: handed-over messages stay in the consent step."""

    async def check_consent(self, messages: list[ClaimedMessage]) -> dict[Any, ConsentAnswer]:
        await asyncio.Event().wait()
        return {}


def _pipeline(**changes: Any) -> SendingPipeline:
    # CONFIG: 8 sends in flight and claims of 10, so 8 + 2 * 10 = 28 messages buffered at most.
    pipeline = SendingPipeline(
        cast(Any, _Store()), cast(Any, _Delivery()), replace(CONFIG, **changes), "w1"
    )
    # As `run` leaves it once its first claim found the table empty.
    pipeline._accepting = True
    pipeline._stop = asyncio.Event()
    pipeline._backlog = False
    return pipeline


@pytest.fixture
async def pipeline() -> AsyncIterator[SendingPipeline]:
    running = _pipeline()
    yield running
    for check in running._checks:
        check.cancel()
    await asyncio.gather(*running._checks, return_exceptions=True)


async def test_reservations_never_hold_more_than_the_free_room(pipeline: SendingPipeline) -> None:
    first = pipeline.reserve([SHOP] * 20)
    second = pipeline.reserve([OTHER] * 20)
    assert sum(first.taken) == 20
    assert second.taken == [True] * 8 + [False] * 12
    second.cancel()
    third = pipeline.reserve([OTHER] * 10)
    assert sum(third.taken) == 8
    first.cancel()
    third.cancel()
    assert pipeline.reserve([SHOP] * 30).taken == [True] * 28 + [False] * 2


async def test_a_hand_over_holds_what_was_inserted_and_gives_the_rest_of_the_room_back(
    pipeline: SendingPipeline,
) -> None:
    reservation = pipeline.reserve([SHOP, SHOP, SHOP])
    message = claimed()
    # One of three inserted: the others were duplicates.
    assert reservation.hand_over([message]) is True
    assert list(pipeline._held) == [message.id]
    assert pipeline._checking == 1 and pipeline._reserved == 0
    assert sum(pipeline.reserve([SHOP] * 30).taken) == 27
    with pytest.raises(RuntimeError):
        reservation.cancel()


async def test_a_saturated_pair_is_refused_and_marks_a_backlog() -> None:
    limited = _pipeline(rate_per_sender=1)  # at most 2 per (sender, tenant) buffered
    reservation = limited.reserve([SHOP, SHOP, SHOP, OTHER])
    assert reservation.taken == [True, True, False, True]
    assert limited._pairs[SHOP] == 2
    reservation.hand_over([])
    assert not limited._pairs
    # The refused message was inserted due: it is claimed before anything else is taken.
    assert limited.reserve([OTHER]).taken == [False]


async def test_nothing_is_taken_while_a_backlog_waits_or_the_pipeline_stops(
    pipeline: SendingPipeline,
) -> None:
    pipeline._backlog = True  # the last claim came back full
    assert pipeline.reserve([SHOP]).taken == [False]
    pipeline._backlog = False
    assert pipeline._stop is not None
    pipeline._stop.set()  # stopping, its claim loop not yet out
    assert pipeline.reserve([SHOP]).taken == [False]
    pipeline._accepting = False  # its claim loop is out
    assert pipeline.reserve([SHOP]).taken == [False]
    assert pipeline._reserved == 0


async def test_messages_handed_over_after_the_pipeline_stopped_are_refused(
    pipeline: SendingPipeline,
) -> None:
    reservation = pipeline.reserve([SHOP])
    pipeline._accepting = False
    assert reservation.hand_over([claimed()]) is False
    assert not pipeline._held and pipeline._reserved == 0


class _CountingConsent:
    """Records each consent check's messages; a check ends when `answer` is set."""

    def __init__(self) -> None:
        self.batches: list[list[ClaimedMessage]] = []
        self.answer = asyncio.Event()

    async def check_consent(self, messages: list[ClaimedMessage]) -> dict[Any, ConsentAnswer]:
        self.batches.append(list(messages))
        await self.answer.wait()
        return {}


async def test_messages_handed_over_during_a_consent_check_share_the_next_one() -> None:
    consent = _CountingConsent()
    pipeline = _pipeline()
    pipeline._delivery = cast(Any, consent)
    pipeline._dispatch = lambda message: None  # type: ignore[method-assign]  # no sends here
    first, second, third = claimed(), claimed(), claimed()
    pipeline.reserve([SHOP]).hand_over([first])
    await asyncio.sleep(0)
    assert consent.batches == [[first]]  # checked at once
    pipeline.reserve([SHOP]).hand_over([second])
    pipeline.reserve([SHOP]).hand_over([third])
    await asyncio.sleep(0)
    assert consent.batches == [[first]]  # waiting for the check under way
    consent.answer.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert consent.batches == [[first], [second, third]]
    await asyncio.gather(*pipeline._checks)
    assert pipeline._checking == 0
