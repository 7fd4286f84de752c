"""Consent answers of held messages are asked again in batches once half their max age old, so
messages held back by a rate limit are not re-checked one call each at send time."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence

from services.outbox.domain import ClaimedMessage, Consent
from services.outbox.sending.consent import ConsentAnswer, refresh_consent
from services.outbox.sending.leases import Held
from tests.unit.outbox.builders import claimed

MAX_AGE_S = 0.2
OLD = Consent(opted_out=False)
NEW = Consent(opted_out=True)


class Routing:
    def __init__(self) -> None:
        self.batches: list[list[uuid.UUID]] = []

    async def check_consent(
        self, messages: Sequence[ClaimedMessage]
    ) -> Mapping[uuid.UUID, ConsentAnswer]:
        self.batches.append([m.id for m in messages])
        return {m.id: ConsentAnswer(NEW, time.monotonic()) for m in messages}


def held(age_s: float, **state: bool) -> Held:
    answer = ConsentAnswer(OLD, time.monotonic() - age_s)
    return Held(claimed(), time.monotonic(), answer, **state)


async def test_aged_answers_of_waiting_messages_are_asked_again_in_batches() -> None:
    waiting = [held(MAX_AGE_S) for _ in range(5)]
    fresh = held(-10.0)  # asked "in the future": stays fresh for the whole test
    started, lost = held(MAX_AGE_S, started=True), held(MAX_AGE_S, lost=True)
    unasked = Held(claimed(), time.monotonic())
    everything = [*waiting, fresh, started, lost, unasked]
    table = {h.message.id: h for h in everything}
    routing, stop = Routing(), asyncio.Event()
    task = asyncio.create_task(refresh_consent(table, routing, MAX_AGE_S, 2, stop))
    await asyncio.sleep(MAX_AGE_S / 4 + 0.05)
    stop.set()
    await task
    assert [len(batch) for batch in routing.batches[:3]] == [2, 2, 1]
    assert {i for batch in routing.batches for i in batch} == {h.message.id for h in waiting}
    assert all(h.consent is not None and h.consent.consent == NEW for h in waiting)
    for untouched in (fresh, started, lost):
        assert untouched.consent is not None and untouched.consent.consent == OLD
    assert unasked.consent is None
