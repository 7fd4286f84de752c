"""Who may publish and subscribe to what on NATS: one user per service identity, its
permissions derived from the table below, rendered as the `authorization` block of every
nats-server configuration (the embedded server of `make run` and the tests, and the deployed
`deploy/base/nats/authorization.conf`, which a test compares with this table).

A service may publish its own events (`<context>.v1.>`; the gateway `gateway.v1.>`), the copies
of its audit-class events (`audit.<tenant>.<context>.v1.>`, infra.events), and the
JetStream API requests of the streams it declares and the consumers it reads, ack those
consumers' messages, and receive replies only on its own inbox prefix (`_INBOX.<user>.>`, set
by `infra.jetstream.connect`), so no service reads another's deliveries or replies. The
subjects are nats-server's (server/jetstream_api.go): `$JS.API.STREAM.{CREATE,UPDATE,INFO}.
<stream>`, `$JS.API.CONSUMER.{CREATE,DURABLE.CREATE,INFO,MSG.NEXT,DELETE}.<stream>...`,
`$JS.ACK.<stream>.<consumer>.>` and flow control `$JS.FC.<stream>.<consumer>.*`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

ADMIN_USER = "admin"
INBOX_ROOT = "_INBOX"


@dataclass(frozen=True)
class Durable:
    """A durable pull consumer a service reads and acks."""

    stream: str
    name: str


@dataclass(frozen=True)
class NatsUser:
    name: str
    # Subjects it publishes to directly (its events, or the gateway's inbound messages).
    publishes: tuple[str, ...]
    # Streams it declares at start (create, or update to the shared declaration).
    declares: tuple[str, ...] = ()
    durables: tuple[Durable, ...] = ()
    # Streams it reads with ephemeral ordered consumers (new events only, no acks).
    follows: tuple[str, ...] = ()

    @property
    def inbox_prefix(self) -> str:
        return f"{INBOX_ROOT}.{self.name}"


# The services' stream and consumer names (infra.streams, each service's ConsumerSpec);
# tests/unit/infra/test_nats_users.py checks they match.
USERS: tuple[NatsUser, ...] = (
    NatsUser("gateway", publishes=("gateway.v1.>",), declares=("INBOUND",)),
    NatsUser(
        "routing",
        publishes=("routing.v1.>", "audit.*.routing.v1.>"),
        declares=("INBOUND", "ROUTING_EVENTS", "AUDIT", "OUTBOX_EVENTS", "SELLER_ADMIN_EVENTS"),
        durables=(
            Durable("INBOUND", "routing"),
            Durable("OUTBOX_EVENTS", "routing-carrier-opt-outs"),
        ),
        follows=("SELLER_ADMIN_EVENTS",),
    ),
    NatsUser(
        "outbox",
        publishes=("outbox.v1.>", "audit.*.outbox.v1.>"),
        declares=("OUTBOX_EVENTS", "AUDIT", "INBOUND", "SELLER_ADMIN_EVENTS"),
        durables=(Durable("INBOUND", "outbox-status-callbacks"),),
        follows=("SELLER_ADMIN_EVENTS",),  # channel changes: services/outbox/channels.py
    ),
    NatsUser("live_session", publishes=("live_session.v1.>",), declares=("LIVE_SESSION_EVENTS",)),
    NatsUser(
        "seller_admin",
        publishes=("seller_admin.v1.>", "audit.*.seller_admin.v1.>"),
        declares=("SELLER_ADMIN_EVENTS", "AUDIT"),
        follows=("AUDIT",),  # answers ListAuditRecords: services/seller_admin/audit_trail.py
    ),
    NatsUser(
        "live_catalog",
        publishes=("live_catalog.v1.>",),
        declares=("LIVE_CATALOG_EVENTS", "ROUTING_EVENTS", "LIVE_SESSION_EVENTS"),
        durables=(
            Durable("ROUTING_EVENTS", "live-catalog"),
            Durable("LIVE_SESSION_EVENTS", "live-catalog-sessions"),
        ),
    ),
)

SERVICE_USERS: Mapping[str, NatsUser] = {user.name: user for user in USERS}


def publish_allow(user: NatsUser) -> list[str]:
    api = "$JS.API"
    subjects = list(user.publishes)
    for stream in user.declares:
        subjects += [f"{api}.STREAM.{verb}.{stream}" for verb in ("CREATE", "UPDATE", "INFO")]
    for durable in user.durables:
        stream, name = durable.stream, durable.name
        subjects += [
            # nats-py creates a named consumer with its filter subject in the API subject,
            # older clients through DURABLE.CREATE; both create only this durable.
            f"{api}.CONSUMER.CREATE.{stream}.{name}",
            f"{api}.CONSUMER.CREATE.{stream}.{name}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{name}",
            f"{api}.CONSUMER.INFO.{stream}.{name}",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.{name}",
            f"$JS.ACK.{stream}.{name}.>",
        ]
    if user.follows:
        subjects.append(f"{api}.STREAM.NAMES")  # nats-py finds the stream by subject
    for stream in user.follows:
        subjects += [
            f"{api}.CONSUMER.CREATE.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.DELETE.{stream}.>",
            f"{api}.CONSUMER.INFO.{stream}.>",  # how many messages a bounded read awaits
            f"$JS.FC.{stream}.>",
        ]
    return list(dict.fromkeys(subjects))


def subscribe_allow(user: NatsUser) -> list[str]:
    return [f"{user.inbox_prefix}.>"]


def render_authorization(password: Callable[[str], str]) -> str:
    """The `authorization` block of nats.conf; `password(user)` is what follows `password:`
    (a quoted value, or a `$VARIABLE` the server resolves from its environment)."""
    lines = [
        "# Generated from infra/nats_users.py (python -m infra.nats_users); do not edit by hand.",
        "authorization {",
        "  users: [",
        f"    {{user: {ADMIN_USER}, password: {password(ADMIN_USER)}}}",
    ]
    for user in USERS:
        lines += [
            f"    {{user: {user.name}, password: {password(user.name)}, permissions: {{",
            f"      publish: {{allow: {_list(publish_allow(user))}}}",
            f"      subscribe: {{allow: {_list(subscribe_allow(user))}}}",
            "    }}",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def password_variable(user: str) -> str:
    """The environment variable the deployed server reads a user's password from."""
    return f"NATS_PASSWORD_{user.upper()}"


def _list(subjects: list[str]) -> str:
    return "[" + ", ".join(f'"{subject}"' for subject in subjects) + "]"


if __name__ == "__main__":
    print(render_authorization(lambda user: "$" + password_variable(user)), end="")
