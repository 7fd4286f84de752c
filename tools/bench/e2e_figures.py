"""The end-to-end benchmark's arithmetic (no I/O): match each posted webhook with the outbound
reply it caused, and turn one steady-rate phase into figures.

A webhook is identified by its MessageSid; routing enqueues the reply with that MessageSid as its
correlation id, so the outbox's row for it tells when the reply was enqueued and whether and when
the sandbox accepted it. Latency = the sandbox's acceptance (as recorded by the outbox) - the
moment the load generator released the webhook, both wall-clock seconds on this one machine; the
enqueue latency (release -> the outbox's row created) is the part spent before the outbox
(gateway, JetStream, routing and its peers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tools.bench.stats import percentile

# Outbox statuses of a message not finished yet; every other status is final.
WAITING_STATUSES = frozenset({"pending", "sending"})
# Final statuses of a message the sandbox accepted (no status callbacks run in the bench).
SENT_STATUSES = frozenset({"sent", "delivered", "read", "failed", "undelivered"})


@dataclass(frozen=True)
class Outbound:
    """The outbox's row for one reply: its status, when it was enqueued, when its first send
    attempt started and, once accepted, when (wall-clock s)."""

    status: str
    enqueued_at: float
    sent_at: float | None
    started_at: float | None = None


@dataclass(frozen=True)
class PhaseSummary:
    rate: float  # requested webhooks/s
    posted: int  # webhooks the load generator sent
    answered_200: int
    sent: int  # replies the sandbox accepted, among the webhooks answered 200
    send_failed: int  # replies that ended without a send (dead, blocked, discarded)
    unrouted: int  # answered 200, but no reply enqueued yet at the cut
    queued: int  # reply enqueued, still pending or sending at the cut
    latencies_ms: list[float]  # sorted, one per sent reply
    enqueue_latencies_ms: list[float]  # sorted, one per enqueued reply
    # sorted, one per sent reply: enqueued -> first send attempt started (claim, consent, lane)
    queued_latencies_ms: list[float]
    send_rps: float  # sent / (last acceptance - first post)

    @property
    def non200(self) -> int:
        """Webhooks answered with another status or not answered at all."""
        return self.posted - self.answered_200

    @property
    def pending(self) -> int:
        return self.unrouted + self.queued

    def sustained(self, webhook_rps: float) -> bool:
        """No growing backlog: the webhooks were posted and the replies sent at 95% of the rate
        or more, every webhook answered 200, nothing left pending at the cut."""
        kept_pace = min(webhook_rps, self.send_rps) >= 0.95 * self.rate
        return kept_pace and not (self.pending or self.non200)

    def figures(self, webhook_rps: float, answer_p99_ms: float) -> dict[str, float]:
        """This phase's figures, named `r<rate>_...` (rate in webhooks/s)."""
        prefix = f"r{self.rate:g}_"
        values = {
            "webhook_rps": round(webhook_rps, 1),
            "send_rps": round(self.send_rps, 1),
            "p50_ms": round(percentile(self.latencies_ms, 50), 1),
            "p99_ms": round(percentile(self.latencies_ms, 99), 1),
            "enqueued_p50_ms": round(percentile(self.enqueue_latencies_ms, 50), 1),
            "enqueued_p99_ms": round(percentile(self.enqueue_latencies_ms, 99), 1),
            "outbox_queued_p50_ms": round(percentile(self.queued_latencies_ms, 50), 1),
            "outbox_queued_p99_ms": round(percentile(self.queued_latencies_ms, 99), 1),
            "answer_p99_ms": round(answer_p99_ms, 2),
            "non200": self.non200,
            "pending": self.pending,
            "send_failed": self.send_failed,
        }
        return {prefix + name: value for name, value in values.items()}


def summarise_phase(
    rate: float,
    posted_at: Mapping[str, float],
    statuses: Mapping[str, int],
    outbound: Mapping[str, Outbound],
) -> PhaseSummary:
    """`posted_at`: MessageSid -> when the webhook was released (wall-clock s), for every webhook
    sent; `statuses`: MessageSid -> HTTP answer; `outbound`: correlation id -> the reply's row."""
    answered = [sid for sid in posted_at if statuses.get(sid) == 200]
    latencies: list[float] = []
    enqueue_latencies: list[float] = []
    queued_latencies: list[float] = []
    last_sent = float("-inf")
    failed = unrouted = queued = 0
    for sid in answered:
        row = outbound.get(sid)
        if row is None:
            unrouted += 1
            continue
        enqueue_latencies.append((row.enqueued_at - posted_at[sid]) * 1000)
        if row.status in WAITING_STATUSES:
            queued += 1
        elif row.status in SENT_STATUSES and row.sent_at is not None:
            latencies.append((row.sent_at - posted_at[sid]) * 1000)
            if row.started_at is not None:
                queued_latencies.append((row.started_at - row.enqueued_at) * 1000)
            last_sent = max(last_sent, row.sent_at)
        else:
            failed += 1
    span = last_sent - min(posted_at.values(), default=last_sent)
    return PhaseSummary(
        rate=rate,
        posted=len(posted_at),
        answered_200=len(answered),
        sent=len(latencies),
        send_failed=failed,
        unrouted=unrouted,
        queued=queued,
        latencies_ms=sorted(latencies),
        enqueue_latencies_ms=sorted(enqueue_latencies),
        queued_latencies_ms=sorted(queued_latencies),
        send_rps=len(latencies) / span if latencies and span > 0 else 0.0,
    )


@dataclass(frozen=True)
class SandboxCheck:
    """Each client wrote once, so each recipient must have been accepted at most once."""

    duplicates: int  # acceptances beyond the first, per recipient
    missing: int  # replies the outbox marked sent that the sandbox never accepted
    strangers: int  # acceptances for recipients no webhook of this run came from

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.missing or self.strangers)


def check_sandbox(
    accepted_by_to: Mapping[str, int], clients: Iterable[str], sent_to: Iterable[str]
) -> SandboxCheck:
    """`accepted_by_to`: the sandbox's count per `To`; `clients`: every client address that
    posted a webhook; `sent_to`: the recipients of the replies the outbox marked sent."""
    known = set(clients)
    return SandboxCheck(
        duplicates=sum(n - 1 for n in accepted_by_to.values() if n > 1),
        missing=sum(1 for to in set(sent_to) if accepted_by_to.get(to, 0) == 0),
        strangers=sum(n for to, n in accepted_by_to.items() if to not in known),
    )
