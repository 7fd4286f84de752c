"""The serving part of every gRPC service's `serve()`, shared: metrics, the server, the
background tasks, then wait for `stop`.

    async with Shutdown() as shutdown:
        ...                              # pool, NATS, peers opened and added to `shutdown`
        await serve_until_stopped(SERVICE, stop, shutdown, server, tasks,
                                  metrics_port=config.metrics_port,
                                  grace_s=config.shutdown_grace_s)

Leaving the `Shutdown` block then closes, in this order: the server (health NOT_SERVING, then
in-flight calls drain within `grace_s`), the background tasks (they finish their batch within
`tasks_grace_s`, `grace_s` unless given; `BackgroundTaskFailed` if one gave up), the metrics
endpoint, then whatever the service added before (NATS, peers, the database).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from infra.grpc_server import GrpcServer
from infra.lifecycle import tune_garbage_collector
from infra.log import get_logger
from infra.metrics import start_metrics_server
from infra.shutdown import DEFAULT_STEP_TIMEOUT_S, Shutdown
from infra.supervisor import BackgroundTasks, Task

_log = get_logger(__name__)


async def serve_until_stopped(
    service: str,
    stop: asyncio.Event,
    shutdown: Shutdown,
    server: GrpcServer,
    tasks: Mapping[str, Task],
    *,
    metrics_port: int,
    grace_s: float,
    tasks_grace_s: float | None = None,
    serving_fields: Mapping[str, object] | None = None,
) -> None:
    """Start the metrics endpoint, the server and the tasks; log `<service>.serving` (with
    the ports and `serving_fields`); return once `stop` is set."""
    tasks_grace = tasks_grace_s if tasks_grace_s is not None else grace_s
    metrics = start_metrics_server(metrics_port)
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
                **(serving_fields or {}),
            }
        },
    )
    await stop.wait()
