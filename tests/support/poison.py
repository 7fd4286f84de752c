"""Poison events for a consumer: an undecodable payload, an enum value no build knows and a
payload over the size limit, published ahead of a good event, and what to check afterwards."""

from __future__ import annotations

import nats.js.errors
import pytest
from nats.js import JetStreamContext
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from infra import jetstream

REJECTED = "snapsell_events_rejected_total"
BAD_PROTOBUF = b"\xff\xff not a protobuf"
UNKNOWN_ENUM = 99  # no enum of the contracts has a value this high


async def publish_poison(js: JetStreamContext, subject: str, unknown_enum: bytes, tag: str) -> None:
    """Publish an undecodable event and `unknown_enum`; the stream refuses a payload over
    `MAX_EVENT_BYTES` outright, so that one never reaches a consumer."""
    await jetstream.publish(js, subject, BAD_PROTOBUF, msg_id=f"{tag}-undecodable")
    await jetstream.publish(js, subject, unknown_enum, msg_id=f"{tag}-unknown-enum")
    with pytest.raises(nats.js.errors.APIError, match="maximum"):
        await jetstream.publish(
            js, subject, b"x" * (jetstream.MAX_EVENT_BYTES + 1), msg_id=f"{tag}-too-large"
        )


def rejected(consumer: str, metrics_text: str | None = None) -> dict[str, float]:
    """The rejection counts of `consumer` by reason, in this process or in `metrics_text`
    (a service's /metrics page)."""
    if metrics_text is None:
        reasons = ("too_large", "undecodable", "unknown_enum")
        values = {
            r: REGISTRY.get_sample_value(REJECTED, {"consumer": consumer, "reason": r})
            for r in reasons
        }
        return {reason: value for reason, value in values.items() if value}
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == REJECTED and sample.labels.get("consumer") == consumer
    }


def increase(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {r: after[r] - before.get(r, 0.0) for r in after if after[r] != before.get(r, 0.0)}


async def assert_nothing_pending(js: JetStreamContext, stream: str, durable: str) -> None:
    """Every message settled once: none waiting, unacknowledged or redelivered."""
    info = await js.consumer_info(stream, durable)
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
