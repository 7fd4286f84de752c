"""The serving part of every gRPC service's `serve()`, shared: the server with the usual
interceptors, metrics, the background tasks, then wait for `stop`.

    async with Shutdown() as shutdown:
        ...                              # peers (gRPC channels) opened and added to `shutdown`
        backends = await open_backends(SERVICE, MIGRATIONS, config, shutdown)
        server = service_server(SERVICE, config, SERVICE_FULL_NAME, verifier, ACCESS_POLICY)
        ...                              # servicers added to `server.server`
        tasks = {**backends.tasks(stop, config.retention), ...}   # plus the service's own
        await serve_until_stopped(SERVICE, stop, shutdown, server, tasks, config)

Leaving the `Shutdown` block then closes, in this order: the server (health NOT_SERVING, then
in-flight calls drain within `config.shutdown_grace_s`), the background tasks (they finish
their batch within `tasks_grace_s`, the same grace unless given; `BackgroundTaskFailed` if one
gave up), the metrics endpoint, then whatever the service added before (NATS, peers, the
database).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncpg
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from infra import jetstream
from infra.auth import AuthInterceptor, JwtVerifier, Policy
from infra.db import open_service_database
from infra.events import EventRelay
from infra.grpc_server import GrpcServer
from infra.jetstream import StreamSpec
from infra.lifecycle import tune_garbage_collector
from infra.log import get_logger
from infra.metrics import RpcMetricsInterceptor, start_metrics_server
from infra.retention import Purge, RetentionSettings, RetentionTask
from infra.shutdown import DEFAULT_STEP_TIMEOUT_S, Shutdown
from infra.streams import events_stream
from infra.supervisor import BackgroundTasks, Task
from infra.telemetry import grpc_server_interceptors

_log = get_logger(__name__)


class ServingConfig(Protocol):
    """What every gRPC service's configuration has (`GRPC_PORT`, `METRICS_PORT`,
    `SHUTDOWN_GRACE_SECONDS`)."""

    @property
    def grpc_port(self) -> int: ...

    @property
    def metrics_port(self) -> int: ...

    @property
    def shutdown_grace_s(self) -> float: ...


class BackendsConfig(Protocol):
    """What a database service's configuration has for its backends."""

    @property
    def db_pool_size(self) -> int: ...

    @property
    def nats_url(self) -> str: ...


@dataclass(frozen=True)
class Backends:
    """A database service's PostgreSQL pool (its schema migrated) and its NATS connection."""

    service: str
    pool: asyncpg.Pool
    nats: NatsClient
    js: JetStreamContext

    def tasks(
        self, stop: asyncio.Event, retention: RetentionSettings, purges: Sequence[Purge] = ()
    ) -> dict[str, Task]:
        """The background tasks every database service runs: its event relay, and the
        retention of its events plus its own `purges`."""
        return {
            "event-relay": lambda: EventRelay(self.pool, self.nats, self.service).run(stop),
            "retention": lambda: RetentionTask.from_settings(self.pool, retention, purges).run(
                stop
            ),
        }


async def open_backends(
    service: str,
    migrations: Path,
    config: BackendsConfig,
    shutdown: Shutdown,
    *,
    streams: Iterable[StreamSpec] = (),
) -> Backends:
    """Migrate and open the database, then connect to NATS (each closed by `shutdown`), and
    declare the service's events stream and the other `streams` it uses. Every service
    declares a stream identically (`infra.streams`), so whichever process starts first
    creates it."""
    pool = await open_service_database(service, migrations, max_size=config.db_pool_size)
    shutdown.add("database", pool.close)
    nats_client = await jetstream.connect(config.nats_url, name=service)
    shutdown.add("nats", nats_client.close)
    js = nats_client.jetstream()
    for spec in (events_stream(service), *streams):
        await jetstream.ensure_stream(js, spec)
    return Backends(service, pool, nats_client, js)


def service_server(
    service: str,
    config: ServingConfig,
    service_full_name: str,
    verifier: JwtVerifier,
    policy: Policy,
) -> GrpcServer:
    """The server of `service` on `config.grpc_port`; add its servicer to `.server`."""
    return GrpcServer(
        config.grpc_port,
        [service_full_name],
        [
            # Metrics first, so calls refused by auth are counted too.
            RpcMetricsInterceptor(service),
            *grpc_server_interceptors(),
            AuthInterceptor(verifier, policy, service=service),
        ],
    )


async def serve_until_stopped(
    service: str,
    stop: asyncio.Event,
    shutdown: Shutdown,
    server: GrpcServer,
    tasks: Mapping[str, Task],
    config: ServingConfig,
    *,
    tasks_grace_s: float | None = None,
    fields: Mapping[str, object] | None = None,
) -> None:
    """Start the metrics endpoint, the server and the tasks; log `<service>.serving` (with
    the ports and `fields`); return once `stop` is set."""
    grace_s = config.shutdown_grace_s
    tasks_grace = tasks_grace_s if tasks_grace_s is not None else grace_s
    metrics = start_metrics_server(config.metrics_port)
    shutdown.add("metrics", metrics.stop)
    background = BackgroundTasks(service, tasks, stop, on_health=server.set_serving)
    # Added before the server so that it closes after it: in-flight calls drain while the
    # tasks still run, then the tasks finish their batch.
    shutdown.add(
        "background-tasks",
        lambda: background.stop(tasks_grace),
        timeout_s=tasks_grace + DEFAULT_STEP_TIMEOUT_S,
    )
    await server.start()
    shutdown.add(
        "grpc-server", lambda: server.stop(grace_s), timeout_s=grace_s + DEFAULT_STEP_TIMEOUT_S
    )
    background.start()
    tune_garbage_collector()
    _log.info(
        f"{service}.serving",
        extra={
            "fields": {
                "grpc_port": server.bound_port,
                "metrics_port": metrics.port,
                **(fields or {}),
            }
        },
    )
    await stop.wait()
