"""Consent for claimed batches: one routing call per batch (split at routing's limit, each
recipient asked once), answers used at send time while fresh, asked again when stale, and a
routing failure making every message of the batch wait."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import grpc
import pytest
from prometheus_client import REGISTRY

from infra.auth import ServiceTokenProvider
from infra.keys import new_signing_key
from services.outbox.clients import (
    MAX_CHECKS_PER_CALL,
    ConsentUnavailableError,
    Recipient,
    RoutingConsentChecker,
)
from services.outbox.domain import Channel, ClaimedMessage, Consent
from services.outbox.sending.consent import BatchConsent
from tests.unit.outbox import builders

ALICE, BOB = "+33611111111", "+33622222222"
OPTED_OUT = Consent(opted_out=True)
FREE = Consent(opted_out=False)


def recipient(value: str, tenant: str = "shop") -> Recipient:
    return (tenant, Channel.SMS, value)


OUTBOX_KEY = new_signing_key("outbox")


class ChunkRecorder(RoutingConsentChecker):
    """The real checker with routing's answer replaced: opted out when the number is odd."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(
            grpc.aio.insecure_channel("127.0.0.1:9"),
            ServiceTokenProvider(OUTBOX_KEY, "routing"),
            timeout_s=1.0,
        )
        self.calls: list[list[Recipient]] = []
        self.fail = fail

    async def _ask(self, recipients: Sequence[Recipient]) -> list[Consent]:
        self.calls.append(list(recipients))
        if self.fail:
            raise ConsentUnavailableError("routing down")
        return [OPTED_OUT if int(value[-1]) % 2 else FREE for _, _, value in recipients]


async def test_a_batch_asks_each_recipient_once_and_answers_in_order() -> None:
    checker = ChunkRecorder()
    asked = [recipient(ALICE), recipient(BOB), recipient(ALICE), recipient(ALICE, "other")]
    answers = await checker.check_many(asked)
    assert answers == [OPTED_OUT, FREE, OPTED_OUT, OPTED_OUT]
    assert checker.calls == [[recipient(ALICE), recipient(BOB), recipient(ALICE, "other")]]


async def test_a_batch_over_routings_limit_is_split_into_calls_within_it() -> None:
    checker = ChunkRecorder()
    asked = [recipient(f"+336{n:08d}") for n in range(2 * MAX_CHECKS_PER_CALL + 5)]
    answers = await checker.check_many(asked)
    assert [len(call) for call in checker.calls] == [MAX_CHECKS_PER_CALL] * 2 + [5]
    assert answers == [OPTED_OUT if n % 2 else FREE for n in range(len(asked))]


async def test_routing_unreachable_is_consent_unavailable() -> None:
    checker = RoutingConsentChecker(
        grpc.aio.insecure_channel("127.0.0.1:9"),
        ServiceTokenProvider(OUTBOX_KEY, "routing"),
        timeout_s=0.3,
    )
    with pytest.raises(ConsentUnavailableError, match="CheckOptOuts"):
        await checker.check_many([recipient(ALICE)])


def claimed(value: str) -> ClaimedMessage:
    return builders.claimed(tenant_id="shop", recipient=value)


def rechecks() -> float:
    return REGISTRY.get_sample_value("snapsell_outbox_consent_rechecks_total") or 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_claimed_batch_is_checked_in_one_call_and_fresh_answers_are_used() -> None:
    checker, clock = ChunkRecorder(), Clock()
    consent = BatchConsent(checker, max_age_s=1.0, clock=clock)
    alice, bob = claimed(ALICE), claimed(BOB)
    answers = await consent.ask([alice, bob])
    assert len(checker.calls) == 1
    clock.now += 1.0
    assert await consent.for_send(alice, answers[alice.id]) == OPTED_OUT
    assert await consent.for_send(bob, answers[bob.id]) == FREE
    assert len(checker.calls) == 1


async def test_an_answer_older_than_the_max_age_is_asked_again_for_that_message() -> None:
    checker, clock = ChunkRecorder(), Clock()
    consent = BatchConsent(checker, max_age_s=1.0, clock=clock)
    alice = claimed(ALICE)
    answers = await consent.ask([alice, claimed(BOB)])
    stale = replace(answers[alice.id], consent=FREE)  # routing has since recorded an opt-out
    before = rechecks()
    clock.now += 1.5
    assert await consent.for_send(alice, stale) == OPTED_OUT
    assert checker.calls[1:] == [[recipient(ALICE)]]
    assert rechecks() == before + 1
    assert await consent.for_send(alice, None) == OPTED_OUT  # no answer: asked now
    assert len(checker.calls) == 3


async def test_routing_failing_the_batch_makes_each_of_its_messages_wait() -> None:
    checker = ChunkRecorder(fail=True)
    consent = BatchConsent(checker, max_age_s=1.0, clock=Clock())
    messages = [claimed(ALICE), claimed(BOB)]
    answers = await consent.ask(messages)
    assert all(answers[m.id].consent is None for m in messages)
    checker.fail = False
    for message in messages:  # not asked again one by one: the message waits
        with pytest.raises(ConsentUnavailableError):
            await consent.for_send(message, answers[message.id])
    assert len(checker.calls) == 1


async def test_an_empty_claim_asks_nothing() -> None:
    checker = ChunkRecorder()
    assert await BatchConsent(checker, max_age_s=1.0).ask([]) == {}
    assert checker.calls == []
