"""Reconciliation's matching rule: which message in Twilio's list an unconfirmed attempt
created."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.outbox.sending.reconcile import ExpectedSend, TwilioMessageView, find_reconciled_send

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


# --- reconciliation ------------------------------------------------------------------------------


def _listed(
    sid: str,
    *,
    body: str = "hello",
    seconds: int = 1,
    to: str = "+33611111111",
    from_: str | None = "+14155550100",
    service: str | None = None,
) -> TwilioMessageView:
    return TwilioMessageView(sid, to, from_, service, body, NOW + timedelta(seconds=seconds))


EXPECTED = ExpectedSend(to="+33611111111", sender="+14155550100", body="hello", since=NOW)
SKEW = timedelta(seconds=2)


def test_reconciliation_adopts_the_twilio_message_that_matches() -> None:
    candidates = [_listed("SM2", body="other"), _listed("SM1")]
    found = find_reconciled_send(candidates, EXPECTED, taken_sids=frozenset(), clock_skew=SKEW)
    assert found is not None and found.sid == "SM1"


def test_reconciliation_ignores_messages_already_recorded_or_too_old() -> None:
    candidates = [_listed("SM1"), _listed("SM0", seconds=-60)]
    taken = frozenset({"SM1"})
    assert find_reconciled_send(candidates, EXPECTED, taken_sids=taken, clock_skew=SKEW) is None


def test_reconciliation_prefers_the_oldest_of_identical_matches() -> None:
    candidates = [_listed("SM9", seconds=5), _listed("SM3", seconds=2)]
    found = find_reconciled_send(candidates, EXPECTED, taken_sids=frozenset(), clock_skew=SKEW)
    assert found is not None and found.sid == "SM3"


def test_templates_match_without_body_and_messaging_services_by_sid() -> None:
    service = "MG" + "a" * 32
    expected = ExpectedSend(to="+33611111111", sender=service, body=None, since=NOW)
    candidates = [_listed("SM1", body="rendered", from_="+1555", service=service)]
    found = find_reconciled_send(candidates, expected, taken_sids=frozenset(), clock_skew=SKEW)
    assert found is not None and found.sid == "SM1"


def test_nothing_listed_means_nothing_was_sent() -> None:
    assert find_reconciled_send([], EXPECTED, taken_sids=frozenset(), clock_skew=SKEW) is None
