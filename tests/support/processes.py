"""Starting a service process for a test and waiting until it is ready (`tools.stack` runs it)."""

from __future__ import annotations

import json

from tools.stack import RunningService, spawn_service

# What each service closes on SIGTERM, in order (`infra.shutdown`): serving first, then its
# peers' channels, NATS and the database (`infra.grpc_service.open_backends`).
_GRPC_SERVING = ["grpc-server", "background-tasks", "metrics"]
SHUTDOWN_STEPS = {
    "seller_admin": [*_GRPC_SERVING, "nats", "database"],
    "live_session": [*_GRPC_SERVING, "nats", "database"],
    "live_catalog": [*_GRPC_SERVING, "outbox-channel", "nats", "database"],
    "routing": [
        *_GRPC_SERVING,
        "seller-admin-channel",
        "live-session-channel",
        "outbox-channel",
        "nats",
        "database",
    ],
    "outbox": [
        *_GRPC_SERVING,
        "routing-channel",
        "seller-admin-channel",
        "twilio",
        "nats",
        "database",
    ],
}


async def start_service(
    name: str, env: dict[str, str], *, port: int | None = None, http: bool = False
) -> RunningService:
    """Start a service process and wait until it is ready (gRPC health SERVING or /readyz)."""
    service = spawn_service(name, env, port=port, http=http)
    await service.wait_ready()
    return service


async def restart(service: RunningService) -> RunningService:
    """Start the same service again on the same port with the same environment."""
    again = spawn_service(service.name, service.env, port=service.port, http=service.http)
    await again.wait_ready()
    return again


def closed_steps(logs: str) -> list[str]:
    """The shutdown steps a process logged as done (`service.closed`), in order."""
    lines = (json.loads(line) for line in logs.splitlines() if line.startswith("{"))
    return [line["step"] for line in lines if line.get("event") == "service.closed"]


def assert_stopped_cleanly(service: RunningService) -> None:
    """SIGTERM: exit 0, every shutdown step of the service done, in its order."""
    assert service.stop() == 0, service.logs()
    assert closed_steps(service.logs()) == SHUTDOWN_STEPS[service.name], service.logs()
