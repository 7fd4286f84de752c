"""Composition root of the outbox service.

    python -m services.outbox           # serve gRPC, run sender workers, consume status
                                        # callbacks, relay and purge events, purge finished
                                        # messages
    python -m services.outbox migrate   # provision role + schema, apply migrations, exit

Serves until SIGTERM: then health goes NOT_SERVING, in-flight calls drain, workers stop
claiming, release what they have not sent, finish their sends and write the results. A crashed
background task is restarted under the crash policy of `infra.supervisor`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path

from snapsell.outbox.v1 import outbox_pb2_grpc
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra import jetstream
from infra.auth import JwtVerifier, ServiceTokenProvider
from infra.entrypoint import run_service
from infra.grpc_client import service_channel
from infra.grpc_service import open_backends, serve_until_stopped, service_server
from infra.shutdown import Shutdown
from infra.streams import audit_stream, events_stream, inbound_stream
from infra.supervisor import Task
from infra.twilio_http import make_twilio_client
from services.outbox.api import ACCESS_POLICY, SERVICE_FULL_NAME, OutboxApi
from services.outbox.channels import ChannelDirectory, follow_channel_changes
from services.outbox.clients import RoutingConsentChecker, routing_channel
from services.outbox.config import Config, load_config, worker_id
from services.outbox.consumer import STATUS_CONSUMER, StatusCallbackHandler
from services.outbox.metrics import report_backlog
from services.outbox.sending.consent import BatchConsent
from services.outbox.sending.pipeline import SendingPipeline
from services.outbox.sending.send import MessageDelivery, utc_now
from services.outbox.sending.twilio_api import TwilioSender, status_callback_url
from services.outbox.status_callbacks import StatusCallbacks
from services.outbox.store import OutboxAdminStore, OutboxStore, finished_message_purges

SERVICE = "outbox"
MIGRATIONS = Path(__file__).parent / "migrations"


def _twilio_sender(config: Config) -> TwilioSender:
    clients = {
        sid: make_twilio_client(
            sid,
            token,
            config.twilio_api_base_url,
            timeout_s=config.worker.send_timeout_s,
            max_connections=config.worker.max_in_flight,
        )
        for sid, token in config.twilio_accounts.items()
    }
    return TwilioSender(clients, status_callback_url(config.public_base_url))


async def serve(stop: asyncio.Event) -> None:
    config = load_config()
    verifier = JwtVerifier.from_env(audience=SERVICE)
    async with Shutdown() as shutdown:
        backends = await open_backends(
            SERVICE,
            MIGRATIONS,
            config,
            shutdown,
            # The channel follower below subscribes to seller_admin's events whether or not
            # seller_admin has started yet.
            streams=[audit_stream(), inbound_stream(), events_stream("seller_admin")],
        )
        pool, js = backends.pool, backends.js
        sender = _twilio_sender(config)
        sender.warm_up()
        shutdown.add("twilio", sender.close)
        seller_admin = service_channel(config.seller_admin_addr, audience="seller_admin")
        shutdown.add("seller-admin-channel", seller_admin.close)
        routing = routing_channel(config.routing_addr)
        shutdown.add("routing-channel", routing.close)
        store = OutboxStore(pool)
        admin = OutboxAdminStore(pool)
        server = service_server(SERVICE, config, SERVICE_FULL_NAME, verifier, ACCESS_POLICY)
        directory = ChannelDirectory(
            seller_admin_pb2_grpc.SellerAdminServiceStub(seller_admin),
            ttl_s=config.channel_cache_ttl_s,
            deadline_s=config.channel_directory_timeout_s,
        )
        # The sending pipeline running now, for the API's direct dispatch (enqueue.py).
        pipelines: list[SendingPipeline] = []
        api = OutboxApi(
            store,
            admin,
            directory,
            account_sids=sender.account_sids,
            max_attempts=config.worker.retry.max_attempts,
            pipeline=(
                (lambda: pipelines[-1] if pipelines else None)
                if config.worker.direct_dispatch
                else None
            ),
        )
        outbox_pb2_grpc.add_OutboxServiceServicer_to_server(api, server.server)
        callbacks = StatusCallbackHandler(StatusCallbacks(pool), lambda: datetime.now(UTC))
        tasks: dict[str, Task] = {
            **backends.tasks(
                stop, config.retention, finished_message_purges(config.finished_max_age)
            ),
            "status-callbacks": lambda: jetstream.run_pull_consumer(
                js,
                STATUS_CONSUMER,
                callbacks,
                stop=stop,
                concurrency=config.status_consumer_concurrency,
            ),
            "channel-follower": lambda: follow_channel_changes(js, directory, stop),
            "backlog": lambda: report_backlog(store, stop),
        }
        this_worker = worker_id()
        if config.worker.enabled:
            checker = RoutingConsentChecker(
                routing,
                ServiceTokenProvider.from_env(SERVICE, audience="routing"),
                timeout_s=config.worker.consent_timeout_s,
            )
            consent = BatchConsent(checker, max_age_s=config.worker.consent_max_age_s)
            delivery = MessageDelivery(
                store, sender, consent, config.worker, this_worker, now=utc_now
            )

            def start_pipeline() -> Awaitable[None]:
                # A new pipeline each start: one that crashed released what it held on the way
                # out (and takes no more enqueues).
                pipelines[:] = [SendingPipeline(store, delivery, config.worker, this_worker)]
                return pipelines[0].run(stop)

            tasks["sender-worker"] = start_pipeline
        await serve_until_stopped(
            SERVICE,
            stop,
            shutdown,
            server,
            tasks,
            config,
            # The sender finishes the sends in flight and writes their results.
            tasks_grace_s=config.shutdown_grace_s + config.worker.send_timeout_s,
            fields={
                "worker_id": this_worker,
                "worker_enabled": config.worker.enabled,
                "max_in_flight": config.worker.max_in_flight,
                "rate_per_sender": config.worker.rate_per_sender,
            },
        )


def main(argv: list[str]) -> None:
    run_service(SERVICE, argv, serve=serve, migrations=MIGRATIONS)


if __name__ == "__main__":
    main(sys.argv[1:])
