"""The NATS permission table (infra/nats_users.py) names the streams and durable consumers the
services really declare and read; a renamed consumer would otherwise be refused at start."""

from __future__ import annotations

from infra.nats_users import SERVICE_USERS, Durable, publish_allow, subscribe_allow
from infra.streams import AUDIT_STREAM, audit_stream, events_stream, inbound_stream
from services.live_catalog.consumer import routed_consumer_spec, sessions_consumer_spec
from services.outbox.channels import CHANNEL_CHANGES
from services.outbox.consumer import STATUS_CONSUMER
from services.routing.consumer import (
    SELLER_ADMIN_CHANGES,
    carrier_consumer_spec,
    inbound_consumer_spec,
)

SERVICES = ("gateway", "routing", "outbox", "live_session", "seller_admin", "live_catalog")
# The services that record audit-class events (infra.events.record_event with an actor).
AUDITED = ("routing", "outbox", "seller_admin")


def test_every_service_has_a_user_that_publishes_only_its_own_events() -> None:
    assert set(SERVICE_USERS) == set(SERVICES)
    for name, user in SERVICE_USERS.items():
        audit_copies = (f"audit.*.{name}.v1.>",) if name in AUDITED else ()
        assert user.publishes == (f"{name}.v1.>", *audit_copies)
        assert (AUDIT_STREAM in user.declares) == (name in AUDITED)
        own_stream = inbound_stream() if name == "gateway" else events_stream(name)
        assert own_stream.name in user.declares
        assert subscribe_allow(user) == [f"_INBOX.{name}.>"]


def test_the_durables_are_the_services_consumers() -> None:
    routing_inbound = inbound_consumer_spec(ack_wait_s=30, max_deliver=5, max_ack_pending=10)
    expected = {
        "routing": {routing_inbound, carrier_consumer_spec()},
        "outbox": {STATUS_CONSUMER},
        "live_catalog": {
            routed_consumer_spec(ack_wait_s=30, max_deliver=5, max_ack_pending=10),
            sessions_consumer_spec(max_deliver=5),
        },
    }
    for name, user in SERVICE_USERS.items():
        specs = expected.get(name, set())
        assert set(user.durables) == {Durable(s.stream, s.durable) for s in specs}
        for spec in specs:
            assert f"$JS.ACK.{spec.stream}.{spec.durable}.>" in publish_allow(user)


def test_routing_and_outbox_follow_seller_admin_events() -> None:
    assert SELLER_ADMIN_CHANGES.startswith("seller_admin.v1.")
    assert CHANNEL_CHANGES.startswith("seller_admin.v1.")
    followers = {name for name, user in SERVICE_USERS.items() if user.follows}
    assert followers == {"routing", "outbox", "seller_admin"}
    for name in ("routing", "outbox"):
        assert SERVICE_USERS[name].follows == (events_stream("seller_admin").name,)


def test_only_seller_admin_reads_the_audit_stream() -> None:
    assert audit_stream().subjects == ("audit.>",)
    readers = {name for name, user in SERVICE_USERS.items() if AUDIT_STREAM in user.follows}
    assert readers == {"seller_admin"}
