"""The outbox's delivery-latency metric, the tenant classes that keep its labels few, and the
backlog gauges (`report_backlog`, a background task).

A tenant class is a name an operator gives a group of tenants (`premium`, `trial`) in
`OUTBOX_TENANT_CLASSES` (`premium=t_1,t_2;trial=t_9`); every other tenant is `standard`.
Metrics are labelled by class, never by tenant id: a label per tenant would make a series per
shop in every bucket.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol

from prometheus_client import Gauge, Histogram

from infra.backlog import report_queue
from infra.config import ConfigError
from infra.events import wait_any
from infra.log import get_logger

_log = get_logger(__name__)

DEFAULT_TENANT_CLASS = "standard"
MAX_TENANT_CLASSES = 8
_CLASS_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")

ENQUEUE_TO_ACCEPTED = Histogram(
    "snapsell_outbox_enqueue_to_accepted_seconds",
    "From Enqueue to Twilio accepting the message (retries and scheduled sends included)",
    ["tenant_class", "kind"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86_400.0),
)


@dataclass(frozen=True, slots=True)
class TenantClasses:
    by_tenant: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def of(self, tenant_id: str) -> str:
        return self.by_tenant.get(tenant_id, DEFAULT_TENANT_CLASS)

    @classmethod
    def parse(cls, text: str, *, source: str = "OUTBOX_TENANT_CLASSES") -> TenantClasses:
        """`class=tenant,tenant;class=tenant`; ConfigError on anything else."""
        by_tenant: dict[str, str] = {}
        classes: set[str] = set()
        for group in filter(None, (part.strip() for part in text.split(";"))):
            name, equals, tenants = group.partition("=")
            name = name.strip()
            if not equals or not _CLASS_NAME.fullmatch(name):
                raise ConfigError(f"{source}: {group!r} is not class=tenant,tenant")
            classes.add(name)
            for tenant in (t.strip() for t in tenants.split(",")):
                if not tenant:
                    raise ConfigError(f"{source}: class {name!r} lists an empty tenant id")
                if tenant in by_tenant:
                    raise ConfigError(f"{source}: tenant {tenant!r} is in two classes")
                by_tenant[tenant] = name
        if len(classes) > MAX_TENANT_CLASSES:
            raise ConfigError(f"{source}: at most {MAX_TENANT_CLASSES} classes")
        return cls(MappingProxyType(by_tenant))


def enqueued_at(message_id: uuid.UUID) -> datetime | None:
    """When the message was enqueued: its id is a UUIDv7 PostgreSQL made at the insert
    (`DEFAULT uuidv7()`), whose first 48 bits are that moment in Unix milliseconds. None for
    an id of another version, which carries no time."""
    if message_id.version != 7:
        return None
    return datetime.fromtimestamp((message_id.int >> 80) / 1000, UTC)


def observe_accepted(
    classes: TenantClasses, tenant_id: str, kind: str, message_id: uuid.UUID, accepted_at: datetime
) -> None:
    enqueued = enqueued_at(message_id)
    if enqueued is not None:
        seconds = (accepted_at - enqueued).total_seconds()
        ENQUEUE_TO_ACCEPTED.labels(classes.of(tenant_id), kind).observe(max(0.0, seconds))


BACKLOG_INTERVAL_S = 15.0
BACKLOG = Gauge(
    "snapsell_outbox_backlog_messages",
    "Messages waiting to be sent (pending, sending) or handled by an operator (dead)",
    ["status"],
)


class BacklogCounts(Protocol):
    """What `report_backlog` reads (`store.OutboxStore`)."""

    async def backlog_counts(self) -> dict[str, int]: ...

    async def due_backlog(self) -> tuple[int, float]: ...


async def report_backlog(store: BacklogCounts, stop: asyncio.Event) -> None:
    """Every `BACKLOG_INTERVAL_S`: messages per status, and the due backlog (infra.backlog)."""
    while not stop.is_set():
        try:
            for status, count in (await store.backlog_counts()).items():
                BACKLOG.labels(status).set(count)
            report_queue("outbox.messages", *await store.due_backlog())
        except Exception as error:  # metrics must never take the service down
            _log.warning("outbox.backlog_failed", extra={"fields": {"error": str(error)}})
        await wait_any(stop, timeout_s=BACKLOG_INTERVAL_S)
