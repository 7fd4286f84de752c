"""Composition root of the live_session service.

    python -m services.live_session           # serve gRPC, sweep idle sessions, relay events
    python -m services.live_session migrate   # provision role + schema, apply migrations, exit

Serves until SIGTERM: then health goes NOT_SERVING, in-flight calls drain, the sweeper and the
event relay and the retention task finish their current batch, and connections close.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from snapsell.live_session.v1 import live_session_pb2_grpc

from infra.auth import JwtVerifier
from infra.entrypoint import run_service
from infra.grpc_service import open_backends, serve_until_stopped, service_server
from infra.shutdown import Shutdown
from services.live_session.api import ACCESS_POLICY, SERVICE_FULL_NAME, LiveSessionApi
from services.live_session.config import load_config
from services.live_session.domain import SystemClock
from services.live_session.store import SessionStore
from services.live_session.sweeper import IdleSweeper
from services.live_session.touch_batcher import TouchBatcher

SERVICE = "live_session"
MIGRATIONS = Path(__file__).parent / "migrations"


async def serve(stop: asyncio.Event) -> None:
    config = load_config()
    verifier = JwtVerifier.from_env(audience=SERVICE)
    async with Shutdown() as shutdown:
        backends = await open_backends(SERVICE, MIGRATIONS, config, shutdown)
        store = SessionStore(backends.pool, SystemClock(), config.inactivity_window)
        server = service_server(SERVICE, config, SERVICE_FULL_NAME, verifier, ACCESS_POLICY)
        live_session_pb2_grpc.add_LiveSessionServiceServicer_to_server(
            LiveSessionApi(store, TouchBatcher(store)), server.server
        )
        tasks = {
            **backends.tasks(stop, config.retention),
            "idle-sweeper": lambda: IdleSweeper(store, config.sweep_interval_s).run(stop),
        }
        serving = {"inactivity_window_minutes": config.inactivity_window.total_seconds() / 60}
        await serve_until_stopped(SERVICE, stop, shutdown, server, tasks, config, fields=serving)


def main(argv: list[str]) -> None:
    run_service(SERVICE, argv, serve=serve, migrations=MIGRATIONS)


if __name__ == "__main__":
    main(sys.argv[1:])
