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

from infra.auth import JwtVerifier
from infra.entrypoint import run_service
from infra.grpc_service import open_backends, serve_until_stopped, service_server
from infra.shutdown import Shutdown
from infra.streams import audit_stream
from services.seller_admin.access import SERVICE_FULL_NAME, auth_policy
from services.seller_admin.api import SellerAdminApi
from services.seller_admin.audit_trail import AuditTrail
from services.seller_admin.config import load_config

SERVICE = "seller_admin"
MIGRATIONS = Path(__file__).parent / "migrations"


async def serve(stop: asyncio.Event) -> None:
    config = load_config()
    verifier = JwtVerifier.from_env(audience=SERVICE)
    async with Shutdown() as shutdown:
        backends = await open_backends(
            SERVICE, MIGRATIONS, config, shutdown, streams=[audit_stream()]
        )
        server = service_server(SERVICE, config, SERVICE_FULL_NAME, verifier, auth_policy())
        seller_admin_pb2_grpc.add_SellerAdminServiceServicer_to_server(
            SellerAdminApi(backends.pool, AuditTrail(backends.js)), server.server
        )
        tasks = backends.tasks(stop, config.retention)
        await serve_until_stopped(SERVICE, stop, shutdown, server, tasks, config)


def main(argv: list[str]) -> None:
    run_service(SERVICE, argv, serve=serve, migrations=MIGRATIONS)


if __name__ == "__main__":
    main(sys.argv[1:])
