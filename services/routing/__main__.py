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
from infra.db import migrate_service, open_service_database
from infra.events import EventRelay
from infra.grpc_client import service_channel
from infra.grpc_server import GrpcServer
from infra.lifecycle import run_main, supervised
from infra.log import get_logger
from infra.metrics import RpcMetricsInterceptor, start_metrics_server
from infra.retention import RetentionTask
from infra.streams import events_stream, inbound_stream
from infra.telemetry import grpc_server_interceptors
from services.routing import store
from services.routing.api import ACCESS_POLICY, SERVICE_FULL_NAME, RoutingApi
from services.routing.config import load_config
from services.routing.consumer import InboundConsumer, inbound_consumer_spec
from services.routing.event_consumers import (
    CarrierOptOutConsumer,
    carrier_consumer_spec,
    follow_changes,
)
from services.routing.inbound import InboundRouter
from services.routing.peers import CachedSenderDirectory, GrpcLiveSessions, GrpcReplySender

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
            events_stream("outbox"),
            events_stream("seller_admin"),
        ):
            await jetstream.ensure_stream(js, spec)
        senders = CachedSenderDirectory(
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
            max_ack_pending=max(1000, config.concurrency * 4),
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
        carrier = CarrierOptOutConsumer(pool)
        routing_pb2_grpc.add_RoutingServiceServicer_to_server(RoutingApi(pool), server.server)
        metrics = start_metrics_server(config.metrics_port)
        await server.start()
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "event-relay": lambda: EventRelay(pool, nats_client, SERVICE).run(stop),
            "inbound-consumer": lambda: jetstream.run_pull_consumer(
                js, inbound_spec, inbound.handle, stop=stop, concurrency=config.concurrency
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
        background = [
            asyncio.create_task(supervised(SERVICE, name, loop, stop), name=name)
            for name, loop in loops.items()
        ]
        _log.info(
            "routing.serving",
            extra={
                "fields": {
                    "grpc_port": server.bound_port,
                    "metrics_port": metrics.port,
                    "consumer_enabled": config.consumer_enabled,
                    "concurrency": config.concurrency,
                    "max_deliver": config.max_deliver,
                }
            },
        )
        await stop.wait()
        await server.stop(config.shutdown_grace_s)
        _, pending = await asyncio.wait(background, timeout=config.shutdown_grace_s)
        for task in pending:  # e.g. a relay stuck on an unreachable NATS
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    finally:
        if metrics is not None:
            metrics.stop()
        if nats_client is not None:
            await nats_client.close()
        for channel in channels:
            await channel.close()
        await pool.close()


async def migrate(_stop: asyncio.Event) -> None:
    await migrate_service(SERVICE, MIGRATIONS)
    _log.info("routing.migrated")


def main(argv: list[str]) -> None:
    if argv == ["migrate"]:
        run_main(migrate, service=SERVICE)
    elif not argv:
        run_main(serve, service=SERVICE)
    else:
        print(f"usage: python -m services.{SERVICE} [migrate]", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
