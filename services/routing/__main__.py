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
from collections.abc import Awaitable, Callable
from pathlib import Path

from snapsell.routing.v1 import routing_pb2_grpc

from infra import jetstream
from infra.auth import AuthInterceptor, JwtVerifier
from infra.db import open_service_database
from infra.entrypoint import run_service
from infra.events import EventRelay
from infra.grpc_client import service_channel
from infra.grpc_server import GrpcServer
from infra.lifecycle import tune_garbage_collector
from infra.log import get_logger
from infra.metrics import RpcMetricsInterceptor, start_metrics_server
from infra.retention import RetentionTask
from infra.streams import audit_stream, events_stream, inbound_stream
from infra.supervisor import BackgroundTasks
from infra.telemetry import grpc_server_interceptors
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

_log = get_logger(__name__)


async def serve(stop: asyncio.Event) -> None:
    config = load_config()
    verifier = JwtVerifier.from_env(audience=SERVICE)
    channels = [
        service_channel(config.seller_admin_addr, audience="seller_admin"),
        service_channel(config.live_session_addr, audience="live_session"),
        service_channel(config.outbox_addr, audience="outbox"),
    ]
    pool = await open_service_database(SERVICE, MIGRATIONS, max_size=config.db_pool_size)
    nats_client = None
    metrics = None
    try:
        nats_client = await jetstream.connect(config.nats_url, name=SERVICE)
        js = nats_client.jetstream()
        # Declared identically by every service (infra.streams), so creating them here is safe
        # whichever process starts first.
        for spec in (
            inbound_stream(),
            events_stream(SERVICE),
            audit_stream(),
            events_stream("outbox"),
            events_stream("seller_admin"),
        ):
            await jetstream.ensure_stream(js, spec)
        senders = ChannelSenderDirectory(
            channels[0], ttl_s=config.sender_cache_ttl_s, deadline_s=config.peer_deadline_s
        )
        router = InboundRouter(
            pool,
            senders=senders,
            sessions=GrpcLiveSessions(channels[1], deadline_s=config.peer_deadline_s),
            replies=GrpcReplySender(channels[2], deadline_s=config.peer_deadline_s),
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
        server = GrpcServer(
            config.grpc_port,
            [SERVICE_FULL_NAME],
            [
                # Metrics first, so calls refused by auth are counted too.
                RpcMetricsInterceptor(SERVICE),
                *grpc_server_interceptors(),
                AuthInterceptor(verifier, ACCESS_POLICY, service=SERVICE),
            ],
        )
        carrier = CarrierOptOutConsumer(pool, config.rules)
        routing_pb2_grpc.add_RoutingServiceServicer_to_server(
            RoutingApi(pool, config.rules), server.server
        )
        metrics = start_metrics_server(config.metrics_port)
        await server.start()
        tune_garbage_collector()
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "event-relay": lambda: EventRelay(pool, nats_client, SERVICE).run(stop),
            "inbound-consumer": lambda: jetstream.run_batch_consumer(
                js,
                inbound_spec,
                inbound.handle_batch,
                stop=stop,
                batch_size=config.batch_size,
                batches_in_flight=config.concurrency,
            ),
            "carrier-opt-out-consumer": lambda: jetstream.run_pull_consumer(
                js, carrier_consumer_spec(), carrier.handle, stop=stop, concurrency=4
            ),
            "seller-admin-follower": lambda: follow_changes(js, senders.invalidate, stop),
            "retention": lambda: RetentionTask.from_settings(
                pool, config.retention, store.ledger_purges(config.ledger_max_age)
            ).run(stop),
        }
        if not config.consumer_enabled:
            del loops["inbound-consumer"]
        background = BackgroundTasks(SERVICE, loops, stop, on_health=server.set_serving)
        background.start()
        _log.info(
            "routing.serving",
            extra={
                "fields": {
                    "grpc_port": server.bound_port,
                    "metrics_port": metrics.port,
                    "consumer_enabled": config.consumer_enabled,
                    "concurrency": config.concurrency,
                    "batch_size": config.batch_size,
                    "max_deliver": config.max_deliver,
                }
            },
        )
        await stop.wait()
        await server.stop(config.shutdown_grace_s)
        await background.stop(config.shutdown_grace_s)
    finally:
        if metrics is not None:
            metrics.stop()
        if nats_client is not None:
            await nats_client.close()
        for channel in channels:
            await channel.close()
        await pool.close()


def main(argv: list[str]) -> None:
    run_service(SERVICE, argv, serve=serve, migrations=MIGRATIONS)


if __name__ == "__main__":
    main(sys.argv[1:])
