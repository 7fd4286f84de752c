"""The whole system as `make run` starts it, for end-to-end tests and benchmarks: the Twilio
sandbox, seller_admin, live_session, routing, outbox, live_catalog and the gateway, each its own
process on free ports, against a PostgreSQL and a NATS JetStream (`infrastructure()` provides them).

Every database service starts on a fresh schema (`reset_service_schema`), so a test module or a
benchmark run sees only its own tenants and messages. Each process logs to its own file under
`<work_dir>/logs` and, with `trace=True`, appends its spans to its own `SNAPSELL_TRACE_FILE`.
Everything is stopped by PID (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx

from infra.db import service_role
from tools.dev_keys import DevKeys
from tools.devstack import EmbeddedNats, EmbeddedPostgres, free_port
from tools.service_process import ROOT, RunningService, spawn_service
from tools.twilio_sandbox.process import SandboxProcess, start_sandbox

DB_SERVICES = ("seller_admin", "live_session", "routing", "outbox", "live_catalog")
# In `make run`'s order (callees before callers); here they all start at once.
SERVICES = (*DB_SERVICES, "gateway")


class Launch(Protocol):
    """Starts one service process (`spawn_service` by default; the image test runs the same
    environment in a container)."""

    def __call__(
        self, name: str, env: dict[str, str], *, port: int, http: bool, log_dir: Path
    ) -> RunningService: ...


@contextlib.contextmanager
def infrastructure(state_dir: Path) -> Iterator[tuple[str, str]]:
    """(admin DSN, NATS URL): DATABASE_URL / NATS_URL when set, else an embedded PostgreSQL and
    NATS JetStream with their state under `state_dir`, stopped (and the cluster removed) on exit."""
    with contextlib.ExitStack() as stops:
        dsn, nats_url = os.environ.get("DATABASE_URL"), os.environ.get("NATS_URL")
        if not dsn:
            postgres = EmbeddedPostgres(state_dir / "postgres")
            stops.callback(postgres.destroy)
            dsn = postgres.start()
        if not nats_url:
            nats = EmbeddedNats(state_dir / "nats")
            stops.callback(nats.stop)
            nats_url = nats.start()
        yield dsn, nats_url


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


@dataclass
class SystemStack:
    admin_dsn: str
    nats_url: str
    keys: DevKeys
    work_dir: Path
    account_sid: str
    auth_token: str
    gateway_port: int
    sandbox: SandboxProcess | None = None
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
        return {name: service.log_path for name, service in self.services.items()}

    async def scrape(self, service: str) -> str:
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.get(self.metrics_url(service))
        reply.raise_for_status()
        return reply.text

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

    async def stop(self) -> None:
        """SIGTERM to every service at once (each drains by itself), then the sandbox."""
        running = [self.services.pop(name) for name in reversed(SERVICES) if name in self.services]
        await asyncio.gather(*(asyncio.to_thread(service.stop) for service in running))
        if self.sandbox is not None:
            self.sandbox.stop()
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
    env: Mapping[str, str] | None = None,
    service_env: Mapping[str, Mapping[str, str]] | None = None,
    trace: bool = True,
    launch: Launch = spawn_service,
    takes_over: SystemStack | None = None,
) -> SystemStack:
    """Start everything and wait until every service is ready; on failure stop what started.

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
        stack.sandbox = start_sandbox({stack.account_sid: stack.auth_token})
        ports = {name: free_port() for name in DB_SERVICES}
        peers = {f"{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()}
        for name in SERVICES:
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
        await asyncio.gather(*(s.wait_ready(timeout_s=60) for s in stack.services.values()))
    except BaseException:
        await stack.stop()
        raise
    return stack
