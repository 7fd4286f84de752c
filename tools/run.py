"""`make run`: the whole stack in the foreground.

Starts embedded PostgreSQL and NATS JetStream unless DATABASE_URL / NATS_URL are set, the
Twilio sandbox unless real Twilio credentials are configured (TWILIO_ACCOUNT_SID and
TWILIO_AUTH_TOKEN without TWILIO_API_BASE_URL), then every service as its own process
(each applies its migrations at start). State persists in `.state/` (`SNAPSELL_STATE_DIR`).
Ctrl-C or SIGTERM stops everything, services first; if any service dies, the rest are stopped
too. One `make run` per state directory: a second one says which PID runs and exits before
starting anything. Every listener binds `BIND_HOST`, loopback unless set.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.dev_keys import DevKeys
from tools.devstack import EmbeddedNats, EmbeddedPostgres, nats_service_env
from tools.twilio_sandbox.process import start_sandbox

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("SNAPSELL_STATE_DIR", "").strip() or ROOT / ".state")
READY_TIMEOUT_S = 60.0
LOCAL_BIND_HOST = "127.0.0.1"

# Started in this order: callees before their callers.
GRPC_SERVICES = {
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


def say(line: str) -> None:
    print(f"[make run] {line}", flush=True)


def dev_credentials() -> dict[str, str]:
    """A stable local Twilio account, created on the first run."""
    path = STATE / "dev-credentials.json"
    if path.exists():
        stored: dict[str, str] = json.loads(path.read_text())
        return stored
    credentials = {
        "TWILIO_ACCOUNT_SID": "AC" + secrets.token_hex(16),
        "TWILIO_AUTH_TOKEN": secrets.token_hex(16),
    }
    path.write_text(json.dumps(credentials, indent=2))
    path.chmod(0o600)
    return credentials


def existing_services() -> list[str]:
    names = [*GRPC_SERVICES, "gateway"]
    return [n for n in names if (ROOT / "services" / n / "__main__.py").exists()]


def reachable_host(bind_host: str) -> str:
    """Where this machine reaches a listener bound to `bind_host` (a wildcard: loopback)."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


def set_listen_addresses(env: dict[str, str]) -> str:
    """Where every service listens (`BIND_HOST`, loopback unless set: the images default to
    0.0.0.0 for pods) and where peers reach them, unless set; the bind host."""
    bind_host = env.setdefault("BIND_HOST", LOCAL_BIND_HOST)
    host = reachable_host(bind_host)
    http_port = int(env.setdefault("HTTP_PORT", "8080"))
    env.setdefault("PUBLIC_BASE_URL", f"http://{host}:{http_port}")
    for name, port in GRPC_SERVICES.items():
        env.setdefault(f"{name.upper()}_ADDR", f"{host}:{port}")
    return bind_host


def grpc_serving(host: str, port: int) -> bool:
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            check = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]  # HealthStub's stubs list no RPC
            reply: health_pb2.HealthCheckResponse = check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            status: int = reply.status
            return status == 200
    except OSError:
        return False


class AlreadyRunningError(RuntimeError):
    """Another `make run` holds this state directory."""


def hold_run_lock(state: Path) -> int:
    """Lock `state/run.pid` for this process's lifetime and write our PID in it; the file
    descriptor to keep open. The kernel drops the lock when the process ends, however it ends,
    so a file left behind by a crash is stale and simply taken over."""
    fd = os.open(state / "run.pid", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunningError(f"make run is already running (PID {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Stack:
    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        # Own session: a terminal's Ctrl-C reaches only this supervisor, which stops the
        # services once each, callers first.
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"], cwd=ROOT, env=env, start_new_session=True
        )
        self.processes[name] = process
        return process

    def wait_ready(self, name: str, probe: Callable[[], bool]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.processes[name].returncode}")
            if probe():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready after {READY_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        for process in reversed(self.processes.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in reversed(self.processes.items()):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in 15s; killing it")
                process.kill()
                process.wait()

    def first_exit(self) -> tuple[str, int] | None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                return name, process.returncode
        return None


def main() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    try:
        hold_run_lock(STATE)
    except AlreadyRunningError as error:
        print(error, file=sys.stderr)
        return 1
    stop_requested = False

    def request_stop(*_: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    env = dict(os.environ)
    credentials = dev_credentials()
    # One signing key per identity in .state/keys/, created once; each service gets its own.
    keys = DevKeys(STATE / "keys")
    env.setdefault("SNAPSELL_TRUSTED_KEYS_FILE", str(keys.trusted_keys_file))
    bind_host = set_listen_addresses(env)
    host = reachable_host(bind_host)
    http_port = int(env["HTTP_PORT"])

    stack = Stack()
    with ExitStack() as cleanup:
        if not env.get("DATABASE_URL"):
            postgres = EmbeddedPostgres(STATE / "postgres", port=int(env.get("PGPORT", "55432")))
            env["DATABASE_URL"] = postgres.start()
            cleanup.callback(postgres.stop)
            say(f"PostgreSQL 18 (embedded) at {env['DATABASE_URL']}")
        if not env.get("NATS_URL"):
            nats_server = EmbeddedNats(STATE / "nats", port=int(env.get("NATS_PORT", "54222")))
            env["NATS_URL"] = nats_server.start()
            cleanup.callback(nats_server.stop)
            say(
                f"NATS JetStream (embedded) at nats://{nats_server.address}"
                f" (user admin, password in {STATE / 'nats' / 'admin.password'})"
            )
        real_twilio = (
            env.get("TWILIO_ACCOUNT_SID")
            and env.get("TWILIO_AUTH_TOKEN")
            and not env.get("TWILIO_API_BASE_URL")
        )
        if not real_twilio:
            env["TWILIO_ACCOUNT_SID"] = credentials["TWILIO_ACCOUNT_SID"]
            env["TWILIO_AUTH_TOKEN"] = credentials["TWILIO_AUTH_TOKEN"]
            sandbox = start_sandbox(
                {env["TWILIO_ACCOUNT_SID"]: env["TWILIO_AUTH_TOKEN"]},
                port=int(env.get("TWILIO_SANDBOX_PORT", "8089")),
            )
            cleanup.callback(sandbox.stop)
            env["TWILIO_API_BASE_URL"] = sandbox.url
            say(f"Twilio sandbox at {sandbox.url} (account {env['TWILIO_ACCOUNT_SID']})")
        cleanup.callback(stack.stop)
        try:
            for name in existing_services():
                service_env = {**env, **nats_service_env(env["NATS_URL"], name)}
                if name != "gateway":
                    own_key = keys.env(name)["SNAPSELL_SIGNING_KEY_FILE"]
                    service_env.setdefault("SNAPSELL_SIGNING_KEY_FILE", own_key)
                if name == "gateway":
                    stack.start(name, service_env)
                    stack.wait_ready(name, lambda: http_ready(f"http://{host}:{http_port}/readyz"))
                    say(
                        f"gateway        http://{bind_host}:{http_port}"
                        f"  (public {env['PUBLIC_BASE_URL']})"
                    )
                    continue
                port = int(env[f"{name.upper()}_ADDR"].rpartition(":")[2])
                service_env["GRPC_PORT"] = str(port)
                service_env["METRICS_PORT"] = str(METRICS_PORTS[name])
                stack.start(name, service_env)
                stack.wait_ready(name, functools.partial(grpc_serving, host, port))
                metrics = f"{bind_host}:{METRICS_PORTS[name]}"
                say(f"{name:<14} grpc {bind_host}:{port}  metrics {metrics}")
        except RuntimeError as error:
            say(f"failed to start: {error}")
            return 1
        say("ready — Ctrl-C stops everything")
        while not stop_requested:
            exited = stack.first_exit()
            if exited:
                say(f"{exited[0]} exited with {exited[1]}; stopping the stack")
                return 1
            time.sleep(0.5)
        say("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
