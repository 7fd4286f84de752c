"""The sandbox's pure rules: fault config parsing, seeded outcomes, filters and segments."""

from __future__ import annotations

import calendar
import time

import pytest

from tools.twilio_sandbox.faults import FaultConfig, FaultConfigError, FaultPlan, Outcome
from tools.twilio_sandbox.store import DateSentFilter, count_segments
from tools.twilio_sandbox.validation import is_valid_recipient


def test_fault_config_defaults_to_no_faults() -> None:
    plan = FaultPlan(FaultConfig.from_json({}))
    assert {plan.draw() for _ in range(100)} == {Outcome.ACCEPT}
    assert plan.permanent_error_for("whatsapp:+33600000001") is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "fault config must be a JSON object"),
        ({"eror_rate": 0.1}, "unknown fault config keys: eror_rate"),
        ({"error_rate": 1.5}, "error_rate must be a number between 0 and 1"),
        ({"error_rate": True}, "error_rate must be a number between 0 and 1"),
        ({"error_status": 200}, "error_status must be a number between 400 and 599"),
        ({"error_rate": 0.6, "rate_limit_rate": 0.6}, "the fault rates must add up to at most 1"),
        ({"error_code_for": {"+33600000001": "21610"}}, "error_code_for must map"),
        ({"auto_callbacks": ["delivered", "seen"]}, "auto_callbacks must be a list of"),
    ],
)
def test_malformed_fault_config_is_refused_with_one_line(data: object, message: str) -> None:
    with pytest.raises(FaultConfigError, match=message.replace("+", r"\+")) as raised:
        FaultConfig.from_json(data)
    assert "\n" not in str(raised.value)


def test_same_seed_draws_the_same_outcomes_and_rates_hold_roughly() -> None:
    config = FaultConfig.from_json(
        {"seed": 7, "rate_limit_rate": 0.1, "error_rate": 0.2, "timeout_after_accept_rate": 0.1}
    )
    plan_a, plan_b = FaultPlan(config), FaultPlan(config)
    first = [plan_a.draw() for _ in range(2000)]
    assert first == [plan_b.draw() for _ in range(2000)]
    assert 0.07 < first.count(Outcome.RATE_LIMIT) / 2000 < 0.13
    assert 0.16 < first.count(Outcome.SERVER_ERROR) / 2000 < 0.24
    assert 0.07 < first.count(Outcome.TIMEOUT_AFTER_ACCEPT) / 2000 < 0.13


def test_permanent_error_matches_with_or_without_channel_prefix() -> None:
    plan = FaultPlan(FaultConfig.from_json({"error_code_for": {"+33600000001": 21610}}))
    assert plan.permanent_error_for("+33600000001") == 21610
    assert plan.permanent_error_for("whatsapp:+33600000001") == 21610
    assert plan.permanent_error_for("whatsapp:+33600000002") is None


def test_fault_config_round_trips_through_json() -> None:
    data = {"error_rate": 0.25, "auto_callbacks": ["sent", "delivered"], "seed": 3}
    config = FaultConfig.from_json(data)
    assert FaultConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("to", "valid"),
    [
        ("+33612345678", True),
        ("whatsapp:+33612345678", True),
        ("+12", False),
        ("33612345678", False),
        ("whatsapp:0612345678", False),
        ("+999123456789", False),  # no such country code
        ("+33 612345678", False),
    ],
)
def test_recipient_must_be_e164_with_a_known_country_code(to: str, valid: bool) -> None:
    assert is_valid_recipient(to) is valid


def _epoch(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def test_date_sent_filters_are_inclusive_and_dates_cover_whole_days() -> None:
    noon = _epoch("2026-11-23T12:00:00")
    assert DateSentFilter.parse(None, "2026-11-23T12:00:00Z", None).matches(noon)
    assert not DateSentFilter.parse(None, "2026-11-23T12:00:01Z", None).matches(noon)
    assert DateSentFilter.parse(None, None, "2026-11-23").matches(_epoch("2026-11-23T23:59:59"))
    assert not DateSentFilter.parse(None, None, "2026-11-22").matches(noon)
    assert DateSentFilter.parse("2026-11-23", None, None).matches(noon)
    assert not DateSentFilter.parse("2026-11-24", None, None).matches(noon)


def test_segments_follow_gsm7_and_ucs2_limits() -> None:
    assert count_segments("a" * 160) == 1
    assert count_segments("a" * 161) == 2
    assert count_segments("é" * 160) == 1  # é is in the GSM-7 set
    assert count_segments("ü" * 160) == 1
    assert count_segments("✓" * 70) == 1
    assert count_segments("✓" * 71) == 2
