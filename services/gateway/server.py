"""The gateway serving webhooks: what `python -m services.gateway [serve]` runs in each process.

Imported only by a process that serves (`__main__.py` decides first), so a supervisor of
several processes never loads uvicorn, NATS, protobuf or tracing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from infra import jetstream
from infra.entrypoint import run_service
from infra.lifecycle import tune_garbage_collector
from infra.shutdown import DEFAULT_STEP_TIMEOUT_S, Shutdown
from infra.streams import inbound_stream
from infra.telemetry import tracing_enabled
from services.gateway.api import create_app
from services.gateway.config import load_config
from services.gateway.events import JetStreamPublisher
from services.gateway.processes import is_worker

SERVICE = "gateway"
# What uvicorn gives the requests in progress to finish once stopping.
GRACEFUL_SHUTDOWN_S = 10


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `run_main` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(stop: asyncio.Event) -> None:
    config = load_config()
    async with Shutdown() as shutdown:
        nc = await jetstream.connect(config.nats_url, name=SERVICE)
        shutdown.add("nats", nc.drain)
        js = nc.jetstream()
        stream = inbound_stream()
        await jetstream.ensure_stream(js, stream)
        publisher = JetStreamPublisher(nc, js, stream.name, config.publish_timeout_s)
        await publisher.start()
        app = create_app(config, publisher.publish, publisher.ready, traced=tracing_enabled())
        server = _Server(
            uvicorn.Config(
                app,
                host=config.bind_host,
                port=config.http_port,
                http="httptools",
                lifespan="off",
                access_log=False,
                log_config=None,
                proxy_headers=True,
                forwarded_allow_ips=list(config.forwarded_allow_ips),
                # Past this many connections (or requests in progress), 503 at once rather
                # than an ever longer queue; slow bodies are cut by the app (api._read_body).
                limit_concurrency=config.max_connections,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            )
        )
        tune_garbage_collector()
        sockets = [_shared_socket(config.bind_host, config.http_port)] if is_worker() else None
        serving = asyncio.create_task(server.serve(sockets=sockets))

        async def stop_serving() -> None:
            server.should_exit = True
            await serving

        shutdown.add(
            "http-server",
            stop_serving,
            timeout_s=GRACEFUL_SHUTDOWN_S + DEFAULT_STEP_TIMEOUT_S,
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()


def _shared_socket(host: str, port: int) -> socket.socket:
    """A listening address several workers bind at once; the kernel spreads connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def main(argv: list[str]) -> None:
    run_service(SERVICE, argv, serve=serve)
