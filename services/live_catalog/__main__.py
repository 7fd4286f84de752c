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
from infra.db import open_service_database
from infra.entrypoint import run_service
from infra.events import EventRelay
from infra.grpc_client import service_channel
from infra.grpc_service import serve_until_stopped, service_server
from infra.retention import RetentionTask
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
        pool = await open_service_database(SERVICE, MIGRATIONS, max_size=config.db_pool_size)
        shutdown.add("database", pool.close)
        shutdown.add("outbox-channel", outbox.close)
        nats_client = await jetstream.connect(config.nats_url, name=SERVICE)
        shutdown.add("nats", nats_client.close)
        js = nats_client.jetstream()
        # Declared identically by every service (infra.streams), so creating them here is safe
        # whichever process starts first.
        for context in (SERVICE, "routing", "live_session"):
            await jetstream.ensure_stream(js, events_stream(context))
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
            "event-relay": lambda: EventRelay(pool, nats_client, SERVICE).run(stop),
            "reply-dispatcher": lambda: dispatcher.run(stop),
            "hold-sweeper": lambda: sweep_holds(store, config.sweep_interval_s, stop),
            "routed-consumer": lambda: jetstream.run_pull_consumer(
                js, routed_spec, routed.handle, stop=stop, concurrency=config.concurrency
            ),
            "session-closed-consumer": lambda: jetstream.run_pull_consumer(
                js, sessions_spec, sessions.handle, stop=stop, concurrency=4
            ),
            "retention": lambda: RetentionTask.from_settings(
                pool, config.retention, ledger_purges(config.ledger_max_age)
            ).run(stop),
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
