"""What Prometheus scrapes from the outbox process: the time from Enqueue to Twilio's
acceptance by tenant class and kind, and the due messages waiting for a sender (the count
KEDA's query in the prod overlay reads too)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.outbox.stack import (
    ACCOUNT_SID,
    SMS_SENDER,
    TENANT,
    OutboxStack,
    eventually,
    new_phone,
    sms,
)
from tests.support.processes import RunningService
from tools.deploy.layout import overlay_dir

LATENCY = "snapsell_outbox_enqueue_to_accepted_seconds"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(service: RunningService) -> Samples:
    port = service.env["METRICS_PORT"]
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape_until(service: RunningService, ready: Callable[[Samples], bool]) -> Samples:
    scraped: Samples = {}

    async def scraped_ready() -> bool:
        scraped.update(await scrape(service))
        return ready(scraped)

    await eventually(scraped_ready)
    return scraped


async def test_due_messages_waiting_are_counted_with_the_age_of_the_oldest(
    stack: OutboxStack,
) -> None:
    assert stack.db is not None
    (await stack.start_outbox(OUTBOX_WORKER_ENABLED="false")).stop()  # its schema, migrated
    await stack.db.execute(
        """
        INSERT INTO outbox.messages (tenant_id, idempotency_key, kind, account_sid, sender,
            recipient_channel, recipient, body, max_attempts, next_attempt_at)
        SELECT 'backlog-shop', 'due-' || n, 'conversational', $1, $2, 'sms', $3, 'hello', 5,
            now() - interval '1 minute'
        FROM generate_series(1, 3) AS n
        """,
        ACCOUNT_SID,
        SMS_SENDER,
        new_phone(),
    )
    # No sender: the three stay due, and the process reports them as soon as it starts.
    idle = await stack.start_outbox(OUTBOX_WORKER_ENABLED="false")
    try:
        queue = frozenset({("queue", "outbox.messages")})
        metrics = await scrape_until(idle, lambda m: ("snapsell_queue_depth", queue) in m)
        assert metrics[("snapsell_queue_depth", queue)] == 3
        assert 60 <= metrics[("snapsell_queue_oldest_age_seconds", queue)] < 120
        assert await stack.db.fetchval(keda_outbox_query()) == 3
    finally:
        idle.stop()
        await stack.db.execute("DELETE FROM outbox.messages WHERE tenant_id = 'backlog-shop'")


def keda_outbox_query() -> str:
    autoscaling = overlay_dir("prod") / "autoscaling.yaml"
    [outbox] = [
        doc
        for doc in yaml.safe_load_all(autoscaling.read_text())
        if doc["kind"] == "ScaledObject" and doc["metadata"]["name"] == "outbox"
    ]
    [trigger] = outbox["spec"]["triggers"]
    return str(trigger["metadata"]["query"])


async def test_a_sent_message_is_timed_from_enqueue_by_tenant_class_and_kind(
    stack: OutboxStack,
) -> None:
    outbox = await stack.start_outbox(OUTBOX_TENANT_CLASSES=f"premium={TENANT};trial=shop-z")
    labels = frozenset({("tenant_class", "premium"), ("kind", "conversational")})
    message_id = await stack.enqueue(recipient=sms(new_phone()), body="your order is ready")
    await stack.wait_status(message_id, "sent")
    metrics = await scrape_until(outbox, lambda m: m.get((f"{LATENCY}_count", labels)) == 1)
    assert 0 < metrics[(f"{LATENCY}_sum", labels)] < 20
    standard = frozenset({("tenant_class", "standard"), ("kind", "conversational")})
    assert (f"{LATENCY}_count", standard) not in metrics
