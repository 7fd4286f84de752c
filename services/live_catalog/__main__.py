"""Composition root of the live_catalog service.

    python -m services.live_catalog           # consume, serve gRPC, sweep holds, send replies
    python -m services.live_catalog migrate   # provision role + schema, apply migrations, exit

Serves until SIGTERM: then health goes NOT_SERVING, the consumers stop fetching and finish (and
ack) the messages in hand, in-flight RPCs drain, the sweeper, the reply dispatcher and the event
relay end their batch, connections close. A SIGKILL at any point loses nothing: unacked
messages come back after AckWait and the ledger makes a second processing a no-op; replies
committed but not yet enqueued are sent by the next dispatcher round.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

from snapsell.live_catalog.v1 import live_catalog_pb2_grpc

from infra import jetstream
from infra.auth import JwtVerifier
from infra.entrypoint import run_service
from infra.grpc_client import service_channel
from infra.grpc_service import open_backends, serve_until_stopped, service_server
from infra.shutdown import Shutdown
from infra.streams import events_stream
from infra.supervisor import Task
from services.live_catalog.api import ACCESS_POLICY, SERVICE_FULL_NAME, LiveCatalogApi
from services.live_catalog.config import load_config
from services.live_catalog.consumer import (
    RoutedConsumer,
    SessionClosedConsumer,
    routed_consumer_spec,
    sessions_consumer_spec,
)
from services.live_catalog.replies import GrpcReplySender, ReplyDispatcher
from services.live_catalog.store import CatalogStore, ledger_purges
from services.live_catalog.sweeper import sweep_holds

SERVICE = "live_catalog"
MIGRATIONS = Path(__file__).parent / "migrations"


def _now() -> datetime:
    return datetime.now(UTC)


async def serve(stop: asyncio.Event) -> None:
    config = load_config()
    verifier = JwtVerifier.from_env(audience=SERVICE)
    async with Shutdown() as shutdown:
        # Before the database, so that a missing signing key fails first; closed before it.
        outbox = service_channel(config.outbox_addr, audience="outbox")
        backends = await open_backends(
            SERVICE,
            MIGRATIONS,
            config,
            shutdown,
            streams=[events_stream("routing"), events_stream("live_session")],
        )
        shutdown.add("outbox-channel", outbox.close)
        pool, js = backends.pool, backends.js
        store = CatalogStore(
            pool,
            _now,
            hold=config.hold,
            settings=config.settings,
            default_max_per_client=config.default_max_per_client,
        )
        dispatcher = ReplyDispatcher(
            pool, GrpcReplySender(outbox, deadline_s=config.peer_deadline_s)
        )
        routed_spec = routed_consumer_spec(
            ack_wait_s=config.ack_wait_s,
            max_deliver=config.max_deliver,
            max_ack_pending=max(1000, config.concurrency * 4),
        )
        sessions_spec = sessions_consumer_spec(max_deliver=config.max_deliver)
        routed = RoutedConsumer(store, routed_spec, dispatcher.wake)
        sessions = SessionClosedConsumer(
            store,
            sessions_spec,
            lambda tenant_id: config.settings.for_tenant(tenant_id).summary_content_sid,
            dispatcher.wake,
        )
        server = service_server(SERVICE, config, SERVICE_FULL_NAME, verifier, ACCESS_POLICY)
        live_catalog_pb2_grpc.add_LiveCatalogServiceServicer_to_server(
            LiveCatalogApi(store), server.server
        )
        tasks: dict[str, Task] = {
            **backends.tasks(stop, config.retention, ledger_purges(config.ledger_max_age)),
            "reply-dispatcher": lambda: dispatcher.run(stop),
            "hold-sweeper": lambda: sweep_holds(store, config.sweep_interval_s, stop),
            "routed-consumer": lambda: jetstream.run_pull_consumer(
                js, routed_spec, routed.handle, stop=stop, concurrency=config.concurrency
            ),
            "session-closed-consumer": lambda: jetstream.run_pull_consumer(
                js, sessions_spec, sessions.handle, stop=stop, concurrency=4
            ),
        }
        if not config.consumer_enabled:
            del tasks["routed-consumer"], tasks["session-closed-consumer"]
        serving = {
            "consumer_enabled": config.consumer_enabled,
            "hold_minutes": config.hold.total_seconds() / 60,
        }
        await serve_until_stopped(SERVICE, stop, shutdown, server, tasks, config, fields=serving)


def main(argv: list[str]) -> None:
    run_service(SERVICE, argv, serve=serve, migrations=MIGRATIONS)


if __name__ == "__main__":
    main(sys.argv[1:])
