"""The outbox's pure rules: retries, error classes, the status state machine, what happens
before a send, reconciliation matching, and the token bucket and fair queue."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.outbox.domain import (
    Channel,
    Consent,
    ErrorClass,
    FairQueue,
    InvalidMessageError,
    MessageKind,
    MessageStatus,
    PreSendDecision,
    RetryPolicy,
    TokenBucket,
    can_apply_callback,
    classify_http_error,
    decide_before_send,
    newer_twilio_status,
    status_from_twilio,
    twilio_address,
)
from services.outbox.validation import (
    E164_CACHE_SIZE,
    is_e164,
    is_possible_number,
    validate_content,
    validate_recipient,
    validate_sender,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


# --- retries -------------------------------------------------------------------------------------


def test_backoff_doubles_from_one_second_and_stops_at_thirty() -> None:
    policy = RetryPolicy()
    steps = [policy.backoff_s(attempt, jitter=0.999999) for attempt in range(1, 8)]
    assert steps == pytest.approx([1, 2, 4, 8, 16, 30, 30], rel=1e-5)


@given(attempt=st.integers(1, 50), jitter=st.floats(0, 1, exclude_max=True))
def test_jittered_backoff_stays_between_half_and_full_step(attempt: int, jitter: float) -> None:
    policy = RetryPolicy()
    step = min(30.0, 2.0 ** (attempt - 1))
    assert step / 2 <= policy.backoff_s(attempt, jitter) < step + 1e-9


def test_retry_after_is_honoured_when_longer_than_the_backoff() -> None:
    policy = RetryPolicy()
    assert policy.retry_delay_s(1, 0.0, retry_after_s=7.0) == 7.0
    assert policy.retry_delay_s(5, 0.0, retry_after_s=0.1) == 8.0  # backoff is longer


def test_an_absurd_retry_after_is_capped() -> None:
    assert RetryPolicy(retry_after_cap_s=60).retry_delay_s(1, 0.0, retry_after_s=86400) == 60


# --- error classes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http_status", "code", "expected"),
    [
        (429, 20429, ErrorClass.RETRYABLE),
        (500, 20500, ErrorClass.RETRYABLE),
        (503, None, ErrorClass.RETRYABLE),
        (401, 20003, ErrorClass.RETRYABLE),
        (400, 21610, ErrorClass.PERMANENT),
        (400, 21211, ErrorClass.PERMANENT),
        (400, 63016, ErrorClass.PERMANENT),
        (400, 21999, ErrorClass.PERMANENT),
        (404, 20404, ErrorClass.PERMANENT),
    ],
)
def test_twilio_errors_are_classified(http_status: int, code: int | None, expected: str) -> None:
    assert classify_http_error(http_status, code) is expected


# --- the status state machine --------------------------------------------------------------------


def test_callbacks_move_a_message_forward_only() -> None:
    assert can_apply_callback(MessageStatus.SENT, MessageStatus.DELIVERED)
    assert can_apply_callback(MessageStatus.DELIVERED, MessageStatus.READ)
    assert can_apply_callback(MessageStatus.SENT, MessageStatus.READ)
    assert can_apply_callback(MessageStatus.SENT, MessageStatus.UNDELIVERED)
    assert not can_apply_callback(MessageStatus.READ, MessageStatus.DELIVERED)
    assert not can_apply_callback(MessageStatus.DELIVERED, MessageStatus.DELIVERED)
    assert not can_apply_callback(MessageStatus.DELIVERED, MessageStatus.FAILED)
    assert not can_apply_callback(MessageStatus.FAILED, MessageStatus.DELIVERED)


@pytest.mark.parametrize(
    "current",
    [MessageStatus.PENDING, MessageStatus.SENDING, MessageStatus.BLOCKED, MessageStatus.DEAD],
)
def test_callbacks_never_touch_a_message_twilio_has_not_accepted(current: MessageStatus) -> None:
    assert not can_apply_callback(current, MessageStatus.DELIVERED)


_CALLBACK_STATUSES = ["queued", "sending", "sent", "delivered", "read", "failed", "undelivered"]
_ORDER = {
    MessageStatus.SENT: 0,
    MessageStatus.DELIVERED: 1,
    MessageStatus.READ: 2,
    MessageStatus.FAILED: 1,
    MessageStatus.UNDELIVERED: 1,
}


@given(st.lists(st.sampled_from(_CALLBACK_STATUSES), max_size=12))
def test_any_sequence_of_callbacks_never_moves_a_message_backward(reported: list[str]) -> None:
    status = MessageStatus.SENT
    for twilio_status in reported:
        target = status_from_twilio(twilio_status)
        assert target is not None
        if can_apply_callback(status, target):
            assert _ORDER[target] > _ORDER[status]
            status = target


def test_twilio_status_strings_map_to_outbox_statuses() -> None:
    assert status_from_twilio("queued") is MessageStatus.SENT
    assert status_from_twilio(" Delivered ") is MessageStatus.DELIVERED
    assert status_from_twilio("received") is None
    assert newer_twilio_status("queued", "sent")
    assert not newer_twilio_status("delivered", "sent")


# --- before a send -------------------------------------------------------------------------------


def _decide(
    *,
    kind: MessageKind = MessageKind.CONVERSATIONAL,
    channel: Channel = Channel.WHATSAPP,
    template: bool = False,
    consent: Consent,
) -> PreSendDecision:
    return decide_before_send(
        kind=kind, channel=channel, is_template=template, consent=consent, now=NOW
    )


def test_an_opted_out_recipient_is_blocked() -> None:
    consent = Consent(opted_out=True, opted_out_at=NOW, last_inbound_at=NOW)
    assert _decide(consent=consent) is PreSendDecision.BLOCK_OPTED_OUT


def test_compliance_messages_reach_an_opted_out_recipient() -> None:
    consent = Consent(opted_out=True, opted_out_at=NOW, last_inbound_at=NOW)
    decision = _decide(kind=MessageKind.COMPLIANCE, consent=consent)
    assert decision is PreSendDecision.SEND


def test_free_form_whatsapp_needs_an_inbound_message_in_the_last_24_hours() -> None:
    recent = Consent(opted_out=False, last_inbound_at=NOW - timedelta(hours=23))
    stale = Consent(opted_out=False, last_inbound_at=NOW - timedelta(hours=25))
    never = Consent(opted_out=False)
    assert _decide(consent=recent) is PreSendDecision.SEND
    assert _decide(consent=stale) is PreSendDecision.DEAD_OUTSIDE_WINDOW
    assert _decide(consent=never) is PreSendDecision.DEAD_OUTSIDE_WINDOW


def test_templates_and_sms_are_not_bound_by_the_window() -> None:
    never = Consent(opted_out=False)
    assert _decide(template=True, consent=never) is PreSendDecision.SEND
    assert _decide(channel=Channel.SMS, consent=never) is PreSendDecision.SEND


# --- rate limit and fairness ---------------------------------------------------------------------


def test_token_bucket_spends_its_burst_then_paces_at_the_rate() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=2, now=0.0)
    waits = [bucket.reserve(0.0) for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.0, 0.1, 0.2])
    assert bucket.reserve(10.0) == 0.0  # refilled, but never beyond the burst
    assert bucket.reserve(10.0) == 0.0
    assert bucket.reserve(10.0) == pytest.approx(0.1)


@given(st.lists(st.sampled_from("abc"), min_size=1, max_size=60))
def test_fair_queue_serves_tenants_round_robin(keys: list[str]) -> None:
    queue: FairQueue[str, tuple[str, int]] = FairQueue()
    for position, key in enumerate(keys):
        queue.push(key, (key, position))
    served = [item for item in iter(queue.pop, None)]
    assert sorted(served) == sorted((key, i) for i, key in enumerate(keys))
    # Per tenant FIFO, and no tenant gets a second turn while another is waiting.
    for key in set(keys):
        mine = [i for k, i in served if k == key]
        assert mine == sorted(mine)
    first_round = {k for k, _ in served[: len(set(keys))]}
    assert first_round == set(keys)


def test_one_tenants_burst_does_not_delay_another_tenants_message() -> None:
    queue: FairQueue[str, str] = FairQueue()
    for i in range(1000):
        queue.push("burst", f"b{i}")
    queue.push("other", "o1")
    assert [queue.pop(), queue.pop()] == ["b0", "o1"]


# --- validation ----------------------------------------------------------------------------------


def test_addresses_are_validated_per_channel() -> None:
    validate_recipient(Channel.SMS, "+33612345678")
    validate_recipient(Channel.WHATSAPP, "+33612345678")
    validate_recipient(Channel.WHATSAPP, "US.13491208655302741918")
    with pytest.raises(InvalidMessageError, match=r"not an E\.164"):
        validate_recipient(Channel.SMS, "+3361234")
    validate_sender("whatsapp:+14155238886", Channel.WHATSAPP)
    validate_sender("MG" + "0" * 32, Channel.WHATSAPP)
    with pytest.raises(InvalidMessageError, match='must start with "whatsapp:"'):
        validate_sender("+14155238886", Channel.WHATSAPP)
    assert twilio_address(Channel.WHATSAPP, "+33612345678") == "whatsapp:+33612345678"


def test_the_e164_verdicts_are_cached_per_number_in_a_bounded_cache() -> None:
    is_possible_number.cache_clear()
    assert is_possible_number.cache_info().maxsize == E164_CACHE_SIZE == 16_384

    for _ in range(3):
        validate_recipient(Channel.SMS, "+33612345678")

    info = is_possible_number.cache_info()
    assert (info.misses, info.hits, info.currsize) == (1, 2, 1)


def test_an_invalid_number_is_refused_after_a_valid_one_was_cached() -> None:
    is_possible_number.cache_clear()
    validate_recipient(Channel.SMS, "+33612345678")
    for _ in range(2):  # the second time from the cache
        with pytest.raises(InvalidMessageError, match=r"not an E\.164"):
            validate_recipient(Channel.SMS, "+3361234")
    validate_recipient(Channel.SMS, "+33612345678")
    assert is_possible_number.cache_info().hits == 2


def test_a_string_too_long_to_parse_is_refused_without_filling_the_cache() -> None:
    is_possible_number.cache_clear()
    assert not is_e164("+33" + "6" * 247)  # 250 characters: parsed, and cached
    assert not is_e164("+33" + "6" * 248)
    assert not is_e164("+33" + "6" * 10_000)
    assert is_possible_number.cache_info().currsize == 1


def test_content_is_a_body_or_a_template() -> None:
    validate_content("hi", None, {})
    validate_content(None, "HX" + "0" * 32, {"1": "x"})
    with pytest.raises(InvalidMessageError, match="exactly one"):
        validate_content(None, None, {})
    with pytest.raises(InvalidMessageError, match="1600"):
        validate_content("x" * 1601, None, {})
    with pytest.raises(InvalidMessageError, match="HX"):
        validate_content(None, "HXnope", {})
