"""Composition root of the routing service.

    python -m services.routing           # consume inbound, serve gRPC, relay and purge events
    python -m services.routing migrate   # provision role + schema, apply migrations, exit

Serves until SIGTERM: then health goes NOT_SERVING, the consumers stop fetching and finish (and
ack) the messages in hand, in-flight RPCs drain, the event relay ends its batch, connections
close. A SIGKILL at any point loses nothing: unacked messages come back after AckWait and the
ledger makes their second processing a no-op when the first one committed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from snapsell.routing.v1 import routing_pb2_grpc

from infra import jetstream
from infra.auth import JwtVerifier
from infra.entrypoint import run_service
from infra.grpc_client import service_channel
from infra.grpc_service import open_backends, serve_until_stopped, service_server
from infra.shutdown import Shutdown
from infra.streams import audit_stream, events_stream, inbound_stream
from infra.supervisor import Task
from services.routing import store
from services.routing.api import ACCESS_POLICY, SERVICE_FULL_NAME, RoutingApi
from services.routing.clients import ChannelSenderDirectory, GrpcLiveSessions, GrpcReplySender
from services.routing.config import load_config
from services.routing.consumer import (
    CarrierOptOutConsumer,
    InboundConsumer,
    carrier_consumer_spec,
    follow_changes,
    inbound_consumer_spec,
)
from services.routing.inbound import InboundRouter

SERVICE = "routing"
MIGRATIONS = Path(__file__).parent / "migrations"


async def serve(stop: asyncio.Event) -> None:
    config = load_config()
    verifier = JwtVerifier.from_env(audience=SERVICE)
    async with Shutdown() as shutdown:
        # Made before the database, so that a missing signing key fails first; closed before
        # NATS and the database.
        seller_admin = service_channel(config.seller_admin_addr, audience="seller_admin")
        live_session = service_channel(config.live_session_addr, audience="live_session")
        outbox = service_channel(config.outbox_addr, audience="outbox")
        backends = await open_backends(
            SERVICE,
            MIGRATIONS,
            config,
            shutdown,
            streams=[
                inbound_stream(),
                audit_stream(),
                events_stream("outbox"),
                events_stream("seller_admin"),
            ],
        )
        shutdown.add("outbox-channel", outbox.close)
        shutdown.add("live-session-channel", live_session.close)
        shutdown.add("seller-admin-channel", seller_admin.close)
        pool, js = backends.pool, backends.js
        senders = ChannelSenderDirectory(
            seller_admin, ttl_s=config.sender_cache_ttl_s, deadline_s=config.peer_deadline_s
        )
        router = InboundRouter(
            pool,
            senders=senders,
            sessions=GrpcLiveSessions(live_session, deadline_s=config.peer_deadline_s),
            replies=GrpcReplySender(outbox, deadline_s=config.peer_deadline_s),
            rules=config.rules,
        )
        inbound_spec = inbound_consumer_spec(
            ack_wait_s=config.ack_wait_s,
            max_deliver=config.max_deliver,
            max_ack_pending=max(1000, config.concurrency * config.batch_size * 2),
        )
        inbound = InboundConsumer(
            router, pool, inbound_spec, retry_delay_cap_s=config.retry_delay_cap_s
        )
        server = service_server(SERVICE, config, SERVICE_FULL_NAME, verifier, ACCESS_POLICY)
        carrier = CarrierOptOutConsumer(pool, config.rules)
        routing_pb2_grpc.add_RoutingServiceServicer_to_server(
            RoutingApi(pool, config.rules), server.server
        )
        tasks: dict[str, Task] = {
            **backends.tasks(stop, config.retention, store.ledger_purges(config.ledger_max_age)),
            "inbound-consumer": lambda: jetstream.run_batch_consumer(
                js,
                inbound_spec,
                inbound.handle_batch,
                stop=stop,
                batch_size=config.batch_size,
                batches_in_flight=config.concurrency,
                linger_s=config.batch_linger_s,
            ),
            "carrier-opt-out-consumer": lambda: jetstream.run_pull_consumer(
                js, carrier_consumer_spec(), carrier.handle, stop=stop, concurrency=4
            ),
            "seller-admin-follower": lambda: follow_changes(js, senders.invalidate, stop),
        }
        if not config.consumer_enabled:
            del tasks["inbound-consumer"]
        serving = {
            "consumer_enabled": config.consumer_enabled,
            "concurrency": config.concurrency,
            "batch_size": config.batch_size,
            "max_deliver": config.max_deliver,
        }
        await serve_until_stopped(SERVICE, stop, shutdown, server, tasks, config, fields=serving)


def main(argv: list[str]) -> None:
    run_service(SERVICE, argv, serve=serve, migrations=MIGRATIONS)


if __name__ == "__main__":
    main(sys.argv[1:])
