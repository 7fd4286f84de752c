"""The outbox benchmark's consent checks for pgqueuer's jobs: asked together, answered each."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.outbox.clients import ConsentUnavailableError, Recipient
from services.outbox.domain import Channel, Consent
from tools.bench.outbox_bench import CoalescedConsent


class RecordingChecker:
    """Opted out: the recipients whose address ends in 9. Every call is recorded."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[Recipient]] = []
        self._fail = fail

    async def check_many(self, recipients: Sequence[Recipient]) -> list[Consent]:
        self.calls.append(list(recipients))
        await asyncio.sleep(0)
        if self._fail:
            raise ConsentUnavailableError("routing down")
        return [Consent(opted_out=address.endswith("9")) for _, _, address in recipients]


def _recipient(number: int) -> Recipient:
    return ("shop", Channel.SMS, f"+3361234567{number}")


async def test_checks_asked_in_one_turn_go_in_one_call_and_each_gets_its_own_answer() -> None:
    checker = RecordingChecker()
    consent = CoalescedConsent(checker)
    answers = await asyncio.gather(*(consent.check(_recipient(n)) for n in range(10)))
    assert checker.calls == [[_recipient(n) for n in range(10)]]
    assert [answer.opted_out for answer in answers] == [False] * 9 + [True]


async def test_checks_asked_after_a_call_left_go_in_the_next_call() -> None:
    checker = RecordingChecker()
    consent = CoalescedConsent(checker)
    first = await consent.check(_recipient(1))
    second = await asyncio.gather(consent.check(_recipient(2)), consent.check(_recipient(9)))
    assert checker.calls == [[_recipient(1)], [_recipient(2), _recipient(9)]]
    assert (first.opted_out, [a.opted_out for a in second]) == (False, [False, True])


async def test_a_failed_call_fails_every_check_it_carried() -> None:
    consent = CoalescedConsent(RecordingChecker(fail=True))
    results = await asyncio.gather(
        consent.check(_recipient(1)), consent.check(_recipient(2)), return_exceptions=True
    )
    assert all(isinstance(result, ConsentUnavailableError) for result in results)
    with pytest.raises(ConsentUnavailableError):
        await consent.check(_recipient(3))
