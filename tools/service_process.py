"""Run a service as its own process, exactly as `make run` does, and stop it by PID.

Shared by the tests (`tests/support/processes.py` re-exports it) and the benchmarks.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.devstack import free_port, nats_service_env

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 30.0


@dataclass
class RunningService:
    name: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path
    http: bool = False
    extra_args: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n{self.logs()}")
            if await (self._http_ready() if self.http else self._grpc_serving()):
                return
            await asyncio.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s}s:\n{self.logs()}")

    async def _grpc_serving(self) -> bool:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def _http_ready(self) -> bool:
        try:
            async with httpx.AsyncClient() as client:
                reply = await client.get(f"http://{self.address}/readyz", timeout=1.0)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200


@functools.cache
def _temporary_log_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="snapsell-service-logs-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _own_signing_key(name: str, env: Mapping[str, str]) -> dict[str, str]:
    """A service started next to a `tools.dev_keys` key set gets its own key (and no other)."""
    if env.get("SNAPSELL_SIGNING_KEY_FILE") or not env.get("SNAPSELL_TRUSTED_KEYS_FILE"):
        return {}
    own = Path(env["SNAPSELL_TRUSTED_KEYS_FILE"]).parent / f"{name}.pem"
    return {"SNAPSELL_SIGNING_KEY_FILE": str(own)} if own.exists() else {}


def process_env(
    name: str,
    env: Mapping[str, str],
    *,
    port: int,
    http: bool,
    inherited: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """`env` with what every service process gets: its port, a metrics port, unbuffered output,
    its own NATS user and signing key (when the stack has them, in `env` or in the `inherited`
    environment the process also gets)."""
    port_var = "HTTP_PORT" if http else "GRPC_PORT"
    full_env = {
        "METRICS_PORT": str(free_port()),
        port_var: str(port),
        **env,
        "PYTHONUNBUFFERED": "1",
    }
    seen = {**(inherited or {}), **full_env}
    if "NATS_USER" not in env and seen.get("NATS_URL"):  # its own NATS user
        full_env |= nats_service_env(seen["NATS_URL"], name)
    full_env.update(_own_signing_key(name, seen))
    return full_env


def log_file(name: str, port: int, log_dir: Path | None) -> Path:
    log_dir = log_dir or _temporary_log_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"{name}-{port}.log"


def spawn_service(
    name: str,
    env: dict[str, str],
    *,
    port: int | None = None,
    http: bool = False,
    log_dir: Path | None = None,
) -> RunningService:
    """Start `python -m services.<name>` with `env` on top of this process's environment; its
    output goes to `<log_dir>/<name>-<port>.log` (`log_dir` by default: a temporary directory
    removed when this process exits; a failing test quotes the log before that)."""
    port = port or free_port()
    full_env = {
        **os.environ,
        **process_env(name, env, port=port, http=http, inherited=os.environ),
    }
    log_path = log_file(name, port, log_dir)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return RunningService(name, port, full_env, process, log_path, http)


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
