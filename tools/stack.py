"""The one way this project runs its processes locally: `make run`, the tests and the benchmarks.

- `spawn_service` starts `python -m services.<name>` (or any module serving gRPC health or
  `GET /readyz`) as its own process in its own session, with its port, a metrics port, its own
  NATS user and signing key; `RunningService` waits until it is ready and stops it by PID
  (SIGTERM, SIGKILL after a grace period, then any worker it forked that outlived it).
- `infrastructure()` gives a PostgreSQL and a NATS JetStream: DATABASE_URL / NATS_URL when set,
  else embedded ones (`tools.devstack`).
- `SystemStack` holds the service processes of one stack and stops them all; `start_system`
  starts a fresh one (every database service on a fresh schema, the Twilio sandbox, free
  ports) for the end-to-end tests and the benchmarks, `make run` (`tools.run`) its own on the
  documented ports. Each process logs to `<work_dir>/logs/<name>-<port>.log` (or to the
  terminal, for `make run`) and, with `trace=True`, appends its spans to its own
  `SNAPSELL_TRACE_FILE`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.db import service_role
from tools.dev_keys import DevKeys
from tools.devstack import EmbeddedNats, EmbeddedPostgres, free_port, nats_service_env

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
# `make run`'s ports, callees before their callers (the order `make run` starts them in).
GRPC_PORTS = {
    "seller_admin": 50054,
    "live_session": 50053,
    "routing": 50051,
    "outbox": 50052,
    "live_catalog": 50055,
}
METRICS_PORTS = {
    "routing": 9101,
    "outbox": 9102,
    "live_session": 9103,
    "seller_admin": 9104,
    "live_catalog": 9105,
}
DB_SERVICES = tuple(GRPC_PORTS)
SERVICES = (*DB_SERVICES, "gateway")
# A peer a stack does not run is given this address: nothing listens on the discard port.
ABSENT_PEER = "127.0.0.1:9"


def process_tree(root: int) -> list[int]:
    """`root` and every descendant alive now (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses; the ppid follows the last ")".
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


@dataclass
class RunningService:
    name: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path | None  # None: its output goes to this process's terminal
    http: bool = False
    module: str = ""
    host: str = "127.0.0.1"  # where this machine reaches it
    terminated: bool = field(default=False, init=False)  # SIGTERM sent

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def terminate(self) -> None:
        """SIGTERM without waiting (`stop` then waits): a stack drains all its processes at once.
        Sent once: a second SIGTERM tells a service to stop draining."""
        if self.process.poll() is None and not self.terminated:
            self.terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = STOP_GRACE_S) -> int:
        """SIGTERM (unless sent already), then wait (SIGKILL after `timeout_s`); workers it
        forked that outlive it are killed by their own PIDs. Returns the exit code."""
        if self.process.poll() is None:
            workers = process_tree(self.pid)[1:]
            self.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until gRPC health says SERVING (`GET /readyz` answers 200 for an HTTP server); raises
        RuntimeError, with the process's log, when it exits first or is not ready in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n{self.logs()}")
            if await (self._http_ready() if self.http else self._grpc_serving()):
                return
            await asyncio.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s:g}s:\n{self.logs()}")

    async def _grpc_serving(self) -> bool:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                check = stub.Check  # type: ignore[attr-defined]  # HealthStub's stubs list no RPC
                reply: health_pb2.HealthCheckResponse = await check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def _http_ready(self) -> bool:
        try:
            # No proxies: an http_proxy in the environment must not intercept 127.0.0.1.
            async with httpx.AsyncClient(trust_env=False) as client:
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
    env: Mapping[str, str],
    *,
    port: int | None = None,
    http: bool = False,
    log_dir: Path | None = None,
    module: str = "",
    host: str = "127.0.0.1",
    to_terminal: bool = False,
) -> RunningService:
    """Start `python -m <module>` (`services.<name>` by default) with `env` on top of this
    process's environment, without waiting; its output goes to `<log_dir>/<name>-<port>.log`
    (`log_dir` by default: a temporary directory removed when this process exits; a failing
    test quotes the log before that), or with `to_terminal` to this process's own output."""
    port = port or free_port()
    full_env = {
        **os.environ,
        **process_env(name, env, port=port, http=http, inherited=os.environ),
    }
    log_path = None if to_terminal else log_file(name, port, log_dir)
    with open(log_path, "ab") if log_path else contextlib.nullcontext() as log:
        # Own session: a terminal's Ctrl-C reaches only the runner, which stops each process
        # once, callers first.
        process = subprocess.Popen(
            [sys.executable, "-m", module or f"services.{name}"],
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,
        )
    return RunningService(name, port, full_env, process, log_path, http, module, host)


@dataclass
class Infrastructure:
    dsn: str
    nats_url: str
    postgres: EmbeddedPostgres | None = None  # None: DATABASE_URL's server, not ours
    nats: EmbeddedNats | None = None  # None: NATS_URL's server, not ours

    @property
    def pids(self) -> dict[str, int]:
        """The embedded servers' PIDs ("postgres", "nats"), for their CPU figures."""
        servers = {"postgres": self.postgres, "nats": self.nats}
        return {name: server.pid for name, server in servers.items() if server and server.pid}


@contextlib.contextmanager
def infrastructure(
    state_dir: Path,
    *,
    keep: bool = False,
    postgres_port: int | None = None,
    nats_port: int | None = None,
) -> Iterator[Infrastructure]:
    """DATABASE_URL / NATS_URL when set, else an embedded PostgreSQL and NATS JetStream with
    their state under `state_dir`, stopped on exit (the cluster removed too, unless `keep`)."""
    with contextlib.ExitStack() as stops:
        found = Infrastructure(os.environ.get("DATABASE_URL", ""), os.environ.get("NATS_URL", ""))
        if not found.dsn:
            found.postgres = EmbeddedPostgres(state_dir / "postgres", port=postgres_port)
            stops.callback(found.postgres.stop if keep else found.postgres.destroy)
            found.dsn = found.postgres.start()
        if not found.nats_url:
            found.nats = EmbeddedNats(state_dir / "nats", port=nats_port)
            stops.callback(found.nats.stop)
            found.nats_url = found.nats.start()
        yield found


async def reset_service_schema(admin_dsn: str, service: str) -> None:
    """Drop the service's schema and everything its role owns; the service re-provisions."""
    role = service_role(service)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{service}" CASCADE')
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            await conn.execute(f'DROP OWNED BY "{role}" CASCADE')
    finally:
        await conn.close()


async def start_sandbox(
    accounts: Mapping[str, str],
    *,
    port: int | None = None,
    log_dir: Path | None = None,
    to_terminal: bool = False,
) -> RunningService:
    """The local Twilio sandbox (`python -m tools.twilio_sandbox`) for `accounts` (Account SID
    -> auth token), on `port` (a free one by default), ready."""
    port = port or free_port()
    env = {
        # Tokens go through the environment, not argv, so they never show in a process list.
        "TWILIO_AUTH_TOKENS": ",".join(f"{sid}={token}" for sid, token in accounts.items()),
        "TWILIO_ACCOUNT_SID": "",
        "TWILIO_AUTH_TOKEN": "",
        "TWILIO_SANDBOX_PORT": str(port),
    }
    sandbox = spawn_service(
        "twilio_sandbox",
        env,
        port=port,
        http=True,
        log_dir=log_dir,
        module="tools.twilio_sandbox",
        to_terminal=to_terminal,
    )
    await sandbox.wait_ready()
    return sandbox


class Launch(Protocol):
    """Starts one service process (`spawn_service` by default; the image test runs the same
    environment in a container)."""

    def __call__(
        self, name: str, env: dict[str, str], *, port: int, http: bool, log_dir: Path
    ) -> RunningService: ...


@dataclass
class SystemStack:
    admin_dsn: str
    nats_url: str
    keys: DevKeys
    work_dir: Path
    account_sid: str
    auth_token: str
    gateway_port: int
    sandbox: RunningService | None = None
    services: dict[str, RunningService] = field(default_factory=dict)

    @property
    def public_base_url(self) -> str:
        """What Twilio (here the sandbox) calls, and what the gateway checks signatures for."""
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def sandbox_url(self) -> str:
        assert self.sandbox is not None
        return self.sandbox.url

    def address(self, service: str) -> str:
        return self.services[service].address

    def metrics_url(self, service: str) -> str:
        if service == "gateway":
            return f"{self.public_base_url}/metrics"
        return f"http://127.0.0.1:{self.services[service].env['METRICS_PORT']}/metrics"

    def trace_file(self, service: str) -> Path:
        return self.work_dir / "traces" / f"{service}.jsonl"

    def spans(self) -> list[dict[str, Any]]:
        """Every span every process has finished so far."""
        found: list[dict[str, Any]] = []
        for service in SERVICES:
            path = self.trace_file(service)
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                found.extend(json.loads(line) for line in lines if line.strip())
        return found

    def log_files(self) -> dict[str, Path]:
        return {name: s.log_path for name, s in self.services.items() if s.log_path}

    async def scrape(self, service: str) -> str:
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.get(self.metrics_url(service))
        reply.raise_for_status()
        return reply.text

    async def sandbox_control(self, method: str, what: str, config: object = None) -> Any:
        """The sandbox's `/_sandbox/<what>` control (`stats`, `reset`, `faults`); its JSON
        answer, None when it has none."""
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{self.sandbox_url}/_sandbox/{what}"
            reply = await client.request(method, url, json=config)
        reply.raise_for_status()
        return reply.json() if reply.content else None

    async def operator_cli(self, *commands: tuple[str, ...]) -> None:
        """Operator CLI commands in turn (`cli`); RuntimeError with its message when one fails."""
        for command in commands:
            done = await asyncio.to_thread(self.cli, *command)
            if done.returncode != 0:
                raise RuntimeError(f"seller_admin cli {command[0]}: {done.stderr.strip()}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The seller_admin operator CLI, run as an operator would, against this stack."""
        env = {
            "PATH": "/usr/bin:/bin",
            "SELLER_ADMIN_ADDR": self.address("seller_admin"),
            **self.keys.env("operator"),
            "TWILIO_ACCOUNT_SID": self.account_sid,
        }
        return subprocess.run(
            [sys.executable, "-m", "services.seller_admin.cli", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def first_exit(self) -> tuple[str, int] | None:
        """The first service found exited, with its exit code; None while all run."""
        for name, service in self.services.items():
            if service.process.poll() is not None:
                return name, service.process.returncode
        return None

    async def stop(self) -> None:
        """SIGTERM to every service at once (each drains by itself), wait for each; then the
        sandbox."""
        running = [self.services.pop(name) for name in reversed(list(self.services))]
        for service in running:
            service.terminate()
        for service in running:
            await asyncio.to_thread(service.stop)
        if self.sandbox is not None:
            await asyncio.to_thread(self.sandbox.stop)
            self.sandbox = None


def _service_env(stack: SystemStack, name: str, trace: bool) -> dict[str, str]:
    env = {
        "DATABASE_URL": stack.admin_dsn,
        "NATS_URL": stack.nats_url,
        **stack.keys.env(name),
        "LOG_LEVEL": "INFO",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "SNAPSELL_TRACE_FILE": str(stack.trace_file(name)) if trace else "",
    }
    if name == "outbox":
        env["TWILIO_API_BASE_URL"] = stack.sandbox_url
    if name in ("gateway", "outbox"):
        env |= {
            "TWILIO_ACCOUNT_SID": stack.account_sid,
            "TWILIO_AUTH_TOKEN": stack.auth_token,
            "TWILIO_AUTH_TOKENS": "",
            "PUBLIC_BASE_URL": stack.public_base_url,
        }
    return env


async def start_system(
    admin_dsn: str,
    nats_url: str,
    keys: DevKeys,
    work_dir: Path,
    *,
    services: Sequence[str] = SERVICES,
    env: Mapping[str, str] | None = None,
    service_env: Mapping[str, Mapping[str, str]] | None = None,
    trace: bool = True,
    launch: Launch = spawn_service,
    takes_over: SystemStack | None = None,
) -> SystemStack:
    """Start the sandbox and `services` (every one by default) and wait until each is ready; on
    failure stop what started. A peer left out is given an address where nothing listens.

    `env` is added to every service's environment, `service_env[name]` to one service's;
    `launch` starts each service process. `takes_over` is a stack whose data `admin_dsn` now
    holds (a restored copy of its database): the schemas are kept, not reset, and its Twilio
    account and auth token stay, so its tenants' channels and signed webhooks remain valid.
    """
    (work_dir / "traces").mkdir(parents=True, exist_ok=True)
    stack = SystemStack(
        admin_dsn=admin_dsn,
        nats_url=nats_url,
        keys=keys,
        work_dir=work_dir,
        account_sid="AC" + secrets.token_hex(16),
        # Random, so a log scan can look for this exact value.
        auth_token=secrets.token_hex(16),
        gateway_port=free_port(),
    )
    if takes_over is not None:
        stack.account_sid, stack.auth_token = takes_over.account_sid, takes_over.auth_token
    else:
        for service in DB_SERVICES:
            await reset_service_schema(admin_dsn, service)
    try:
        stack.sandbox = await start_sandbox(
            {stack.account_sid: stack.auth_token}, log_dir=work_dir / "logs"
        )
        ports = {name: free_port() for name in DB_SERVICES if name in services}
        peers = {
            f"{name.upper()}_ADDR": f"127.0.0.1:{ports[name]}" if name in ports else ABSENT_PEER
            for name in DB_SERVICES
        }
        for name in services:
            process_env = {
                **_service_env(stack, name, trace),
                **peers,
                **(env or {}),
                **((service_env or {}).get(name, {})),
            }
            is_gateway = name == "gateway"
            # Started together: each process waits for its peers by itself (gRPC retries,
            # JetStream redelivery), exactly as in a cluster where pods start in any order.
            stack.services[name] = launch(
                name,
                process_env,
                port=stack.gateway_port if is_gateway else ports[name],
                http=is_gateway,
                log_dir=work_dir / "logs",
            )
        await asyncio.gather(*(s.wait_ready() for s in stack.services.values()))
    except BaseException:
        await stack.stop()
        raise
    return stack
