"""The JetStream streams of the system: their names and subjects are part of the contracts,
declared here once so every service provisions them identically."""

from __future__ import annotations

from infra.config import env_int
from infra.events import AUDIT_SUBJECT_PREFIX
from infra.jetstream import StreamSpec
from infra.retention import DEFAULT_AUDIT_RETENTION_DAYS, MAX_RETENTION_DAYS

INBOUND_MESSAGE_SUBJECT = "gateway.v1.message.received"
INBOUND_STATUS_SUBJECT = "gateway.v1.status.received"


def _replicas() -> int:
    # 3 in a production cluster; 1 on a single embedded server.
    return env_int("NATS_STREAM_REPLICAS", 1, minimum=1, maximum=5)


def inbound_stream() -> StreamSpec:
    """What the gateway accepted from Twilio. The duplicate window outlasts Twilio's retries."""
    return StreamSpec(name="INBOUND", subjects=("gateway.v1.>",), replicas=_replicas())


def events_stream(context: str) -> StreamSpec:
    """A bounded context's domain events, `<context>.v1.<entity>.<past_tense>`."""
    return StreamSpec(
        name=f"{context.upper()}_EVENTS", subjects=(f"{context}.v1.>",), replicas=_replicas()
    )


AUDIT_STREAM = "AUDIT"


def audit_stream() -> StreamSpec:
    """Copies of every service's audit-class events, `audit.<tenant>.<event subject>`, kept
    `AUDIT_STREAM_MAX_AGE_DAYS` (default 400) where the services' own streams keep 7 days."""
    days = env_int(
        "AUDIT_STREAM_MAX_AGE_DAYS",
        DEFAULT_AUDIT_RETENTION_DAYS,
        minimum=1,
        maximum=MAX_RETENTION_DAYS,
    )
    return StreamSpec(
        name=AUDIT_STREAM,
        subjects=(f"{AUDIT_SUBJECT_PREFIX}.>",),
        max_age_s=days * 86400.0,
        replicas=_replicas(),
    )
