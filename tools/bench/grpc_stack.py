"""What the gRPC benchmarks share: a bare `grpc.aio` unary echo with the same server settings as
the services (run as `python -m tools.bench.grpc_stack PORT`), the process stack a benchmark
drives (PostgreSQL, NATS, one service and the echo, stopped by PID), and round statistics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.grpc_server import GrpcServer
from tools.dev_keys import DevKeys
from tools.devstack import EmbeddedNats, EmbeddedPostgres, free_port

ROOT = Path(__file__).resolve().parents[2]
ECHO_SERVICE = "bench.v1.EchoService"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve_echo(port: int) -> None:
    server = GrpcServer(port, [ECHO_SERVICE], host="127.0.0.1")
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    server.server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": handler}),)
    )
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1.0)


# --- processes ------------------------------------------------------------------------------


class Stack:
    """PostgreSQL, NATS, one service and the echo server; stopped by PID."""

    def __init__(self, service: str, state: Path) -> None:
        self.service = service
        self.state = state
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {service: free_port(), "echo": free_port()}
        self.keys = DevKeys(state / "keys")
        self._stops: list[Callable[[], None]] = []

    def _infra(self) -> tuple[str, str]:
        dsn, url = os.environ.get("DATABASE_URL"), os.environ.get("NATS_URL")
        if not dsn:
            postgres = EmbeddedPostgres(self.state / "postgres")
            dsn = postgres.start()
            self._stops.append(postgres.destroy)
        if not url:
            nats = EmbeddedNats(self.state / "nats")
            url = nats.start()
            self._stops.append(nats.stop)
        return dsn, url

    async def start(self) -> None:
        dsn, nats_url = self._infra()
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "NATS_URL": nats_url,
            **self.keys.env(self.service),
            "LOG_LEVEL": "WARNING",
            "GRPC_PORT": str(self.ports[self.service]),
            "METRICS_PORT": str(free_port()),
        }
        self._spawn(self.service, [sys.executable, "-m", f"services.{self.service}"], env)
        echo = [sys.executable, "-m", "tools.bench.grpc_stack", str(self.ports["echo"])]
        self._spawn("echo", echo, dict(os.environ))
        for name in self.processes:
            await self._wait_serving(name)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        with (self.state / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def _wait_serving(self, name: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.address(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited; see {self.state / (name + '.log')}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{name} not serving after {timeout_s}s")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()


@contextlib.contextmanager
def state_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}


if __name__ == "__main__":
    uvloop.run(serve_echo(int(sys.argv[1])))
