"""Composition root of the seller_admin service.

    python -m services.seller_admin           # serve gRPC, relay and purge audit events
    python -m services.seller_admin migrate   # provision role + schema, apply migrations, exit

Serves until SIGTERM: then health goes NOT_SERVING, in-flight calls drain, the event relay and
the retention task finish their current batch, and connections close.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra import jetstream
from infra.auth import AuthInterceptor, JwtVerifier
from infra.db import open_service_database
from infra.entrypoint import run_service
from infra.events import EventRelay
from infra.grpc_server import GrpcServer
from infra.lifecycle import tune_garbage_collector
from infra.log import get_logger
from infra.metrics import RpcMetricsInterceptor, start_metrics_server
from infra.retention import RetentionTask
from infra.streams import audit_stream, events_stream
from infra.supervisor import BackgroundTasks
from infra.telemetry import grpc_server_interceptors
from services.seller_admin.access import SERVICE_FULL_NAME, auth_policy
from services.seller_admin.api import SellerAdminApi
from services.seller_admin.audit_trail import AuditTrail
from services.seller_admin.config import load_config

SERVICE = "seller_admin"
MIGRATIONS = Path(__file__).parent / "migrations"

_log = get_logger(__name__)


async def serve(stop: asyncio.Event) -> None:
    config = load_config()
    verifier = JwtVerifier.from_env(audience=SERVICE)
    pool = await open_service_database(SERVICE, MIGRATIONS, max_size=config.db_pool_size)
    nats_client = None
    metrics = None
    try:
        nats_client = await jetstream.connect(config.nats_url, name=SERVICE)
        js = nats_client.jetstream()
        await jetstream.ensure_stream(js, events_stream(SERVICE))
        await jetstream.ensure_stream(js, audit_stream())
        server = GrpcServer(
            config.grpc_port,
            [SERVICE_FULL_NAME],
            [
                # Metrics first, so calls refused by auth are counted too.
                RpcMetricsInterceptor(SERVICE),
                *grpc_server_interceptors(),
                AuthInterceptor(verifier, auth_policy(), service=SERVICE),
            ],
        )
        seller_admin_pb2_grpc.add_SellerAdminServiceServicer_to_server(
            SellerAdminApi(pool, AuditTrail(js)), server.server
        )
        metrics = start_metrics_server(config.metrics_port)
        await server.start()
        background = BackgroundTasks(
            SERVICE,
            {
                "event-relay": lambda: EventRelay(pool, nats_client, SERVICE).run(stop),
                "retention": lambda: RetentionTask.from_settings(pool, config.retention).run(stop),
            },
            stop,
            on_health=server.set_serving,
        )
        background.start()
        tune_garbage_collector()
        _log.info(
            "seller_admin.serving",
            extra={"fields": {"grpc_port": server.bound_port, "metrics_port": metrics.port}},
        )
        await stop.wait()
        await server.stop(config.shutdown_grace_s)
        await background.stop(config.shutdown_grace_s)
    finally:
        if metrics is not None:
            metrics.stop()
        if nats_client is not None:
            await nats_client.close()
        await pool.close()


def main(argv: list[str]) -> None:
    run_service(SERVICE, argv, serve=serve, migrations=MIGRATIONS)


if __name__ == "__main__":
    main(sys.argv[1:])
