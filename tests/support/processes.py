"""Starting a service process for a test and waiting until it is ready (`tools.stack` runs it)."""

from __future__ import annotations

from tools.stack import RunningService, spawn_service


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
