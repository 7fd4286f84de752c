"""The end-to-end benchmark's matching of webhooks to replies and its figures."""

from __future__ import annotations

import math

import pytest

from tools.bench.e2e_figures import Outbound, check_sandbox, summarise_phase
from tools.bench.stats import percentile


def test_latency_is_acceptance_minus_release_per_message_sid() -> None:
    posted = {"SM1": 100.0, "SM2": 100.5}
    outbound = {
        "SM1": Outbound("sent", enqueued_at=100.010, sent_at=100.040, started_at=100.030),
        "SM2": Outbound("sent", enqueued_at=100.600, sent_at=100.700, started_at=100.605),
    }
    summary = summarise_phase(2, posted, {"SM1": 200, "SM2": 200}, outbound)
    assert summary.latencies_ms == pytest.approx([40.0, 200.0])
    assert summary.enqueue_latencies_ms == pytest.approx([10.0, 100.0])
    assert summary.queued_latencies_ms == pytest.approx([5.0, 20.0])
    assert (summary.sent, summary.pending, summary.non200) == (2, 0, 0)


def test_replies_not_routed_or_still_queued_are_pending_not_latencies() -> None:
    posted = {"SM1": 10.0, "SM2": 10.1, "SM3": 10.2}
    outbound = {
        "SM1": Outbound("sent", 10.05, 10.1),
        "SM2": Outbound("sending", 10.2, None),
    }
    summary = summarise_phase(3, posted, dict.fromkeys(posted, 200), outbound)
    assert (summary.unrouted, summary.queued, summary.pending) == (1, 1, 2)
    assert summary.sent == 1
    assert len(summary.enqueue_latencies_ms) == 2


def test_webhooks_not_answered_200_are_counted_and_expect_no_reply() -> None:
    posted = {"SM1": 1.0, "SM2": 1.1, "SM3": 1.2}
    summary = summarise_phase(3, posted, {"SM1": 200, "SM2": 503}, {})
    assert summary.non200 == 2  # one 503, one never answered
    assert summary.answered_200 == 1
    assert summary.pending == 1


def test_dead_or_blocked_reply_is_a_send_failure() -> None:
    posted = {"SM1": 1.0, "SM2": 1.1}
    outbound = {"SM1": Outbound("dead", 1.2, None), "SM2": Outbound("blocked", 1.2, None)}
    summary = summarise_phase(2, posted, dict.fromkeys(posted, 200), outbound)
    assert (summary.send_failed, summary.sent, summary.pending) == (2, 0, 0)
    assert summary.send_rps == 0.0


def test_send_rate_runs_from_first_post_to_last_acceptance() -> None:
    posted = {f"SM{i}": 50.0 + i / 10 for i in range(10)}  # 10 webhooks over 0.9 s
    outbound = {
        sid: Outbound("sent", at, 50.0 + 2 * i / 10) for i, (sid, at) in enumerate(posted.items())
    }
    summary = summarise_phase(10, posted, dict.fromkeys(posted, 200), outbound)
    assert summary.send_rps == pytest.approx(10 / 1.8)


@pytest.mark.parametrize(
    ("send_seconds", "pending", "sustained"),
    [(1.0, 0, True), (1.2, 0, False), (1.0, 1, False)],
    ids=["kept-pace", "replies-fell-behind", "left-pending"],
)
def test_a_rate_is_sustained_only_when_the_replies_kept_pace(
    send_seconds: float, pending: int, sustained: bool
) -> None:
    posted = {f"SM{i}": i / 100 for i in range(100)}  # 100 webhooks/s for 1 s
    outbound = {
        sid: Outbound("sent", at, at + send_seconds * (i + 1) / 100 - i / 100)
        for i, (sid, at) in enumerate(posted.items())
    }
    outbound |= {f"SMp{i}": Outbound("pending", 0.5, None) for i in range(pending)}
    posted |= {f"SMp{i}": 0.5 for i in range(pending)}
    summary = summarise_phase(100, posted, dict.fromkeys(posted, 200), outbound)
    assert summary.sustained(100.0) is sustained


def test_figures_are_named_by_rate_with_their_unit() -> None:
    posted = {"SM1": 0.0}
    outbound = {"SM1": Outbound("sent", 0.01, 0.05)}
    figures = summarise_phase(300, posted, {"SM1": 200}, outbound).figures(299.7, 3.456)
    assert figures["r300_webhook_rps"] == 299.7
    assert figures["r300_p50_ms"] == figures["r300_p99_ms"] == 50.0
    assert figures["r300_enqueued_p50_ms"] == 10.0
    assert figures["r300_answer_p99_ms"] == 3.46
    counts = ("r300_non200", "r300_pending", "r300_send_failed")
    assert [figures[name] for name in counts] == [0, 0, 0]


def test_percentile_is_nearest_rank_and_nan_without_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_sandbox_check_passes_when_each_client_got_one_reply() -> None:
    clients = ["whatsapp:+33600000001", "whatsapp:+33600000002"]
    # The second reply was accepted but not yet marked sent by the outbox: in flight, fine.
    check = check_sandbox(dict.fromkeys(clients, 1), clients, sent_to=clients[:1])
    assert check.ok


def test_sandbox_check_finds_duplicates_missing_and_strangers() -> None:
    clients = ["whatsapp:+33600000001", "whatsapp:+33600000002"]
    accepted = {clients[0]: 3, "whatsapp:+33699999999": 1}
    check = check_sandbox(accepted, clients, sent_to=clients)
    assert (check.duplicates, check.missing, check.strangers) == (2, 1, 1)
    assert not check.ok
