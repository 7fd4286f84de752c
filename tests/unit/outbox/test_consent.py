"""Checks of one recipient that overlap in time share a single CheckOptOut call; the answer
(or the failure) reaches every caller, and nothing is remembered afterwards."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from infra.auth import ServiceTokenProvider
from services.outbox.consent import ConsentUnavailableError, RoutingConsentChecker
from services.outbox.domain import Channel, Consent

ALICE, BOB = "+33611111111", "+33622222222"


class ControlledChecker(RoutingConsentChecker):
    """The real checker with routing's answer replaced by futures the test resolves."""

    def __init__(self) -> None:
        super().__init__(
            grpc.aio.insecure_channel("127.0.0.1:9"),
            ServiceTokenProvider("s" * 32, "outbox"),
            timeout_s=1.0,
        )
        self.asked: list[str] = []
        self.answers: dict[str, asyncio.Future[Consent]] = {}

    async def _ask(self, tenant_id: str, channel: Channel, value: str) -> Consent:
        self.asked.append(value)
        self.answers[value] = asyncio.get_running_loop().create_future()
        return await self.answers[value]


async def test_overlapping_checks_of_one_recipient_share_one_call() -> None:
    checker = ControlledChecker()
    tasks = [
        asyncio.create_task(checker.check("shop", Channel.SMS, who)) for who in (ALICE, ALICE, BOB)
    ]
    await asyncio.sleep(0.01)
    assert sorted(checker.asked) == [ALICE, BOB]
    checker.answers[ALICE].set_result(Consent(opted_out=True))
    checker.answers[BOB].set_result(Consent(opted_out=False))
    results = await asyncio.gather(*tasks)
    assert [r.opted_out for r in results] == [True, True, False]
    again = asyncio.create_task(checker.check("shop", Channel.SMS, ALICE))
    await asyncio.sleep(0.01)
    assert checker.asked.count(ALICE) == 2  # asked again: answers are never cached
    checker.answers[ALICE].set_result(Consent(opted_out=False))
    assert not (await again).opted_out


async def test_a_failure_reaches_every_caller_of_the_shared_call() -> None:
    checker = ControlledChecker()
    tasks = [asyncio.create_task(checker.check("shop", Channel.SMS, ALICE)) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert checker.asked == [ALICE]
    checker.answers[ALICE].set_exception(ConsentUnavailableError("routing down"))
    for task in tasks:
        with pytest.raises(ConsentUnavailableError):
            await task
