"""The gateway's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WEBHOOK_REQUESTS = Counter(
    "snapsell_gateway_webhook_requests_total",
    "Twilio webhooks received, by endpoint and outcome.",
    ["endpoint", "outcome"],
)
WEBHOOK_DURATION = Histogram(
    "snapsell_gateway_webhook_duration_seconds",
    "Time to answer a Twilio webhook, JetStream acknowledgement included.",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PUBLISH_DURATION = Histogram(
    "snapsell_gateway_jetstream_publish_duration_seconds",
    "Time from publish to JetStream acknowledgement.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2),
)

_durations = {e: WEBHOOK_DURATION.labels(endpoint=e) for e in ("messages", "status")}
_counters: dict[tuple[str, str], Counter] = {}


def observe_webhook(endpoint: str, outcome: str, seconds: float) -> None:
    counter = _counters.get((endpoint, outcome))
    if counter is None:
        counter = _counters[(endpoint, outcome)] = WEBHOOK_REQUESTS.labels(endpoint, outcome)
    counter.inc()
    _durations[endpoint].observe(seconds)
