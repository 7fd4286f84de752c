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

import asyncio
import fcntl
import json
import os
import secrets
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

from services.seller_admin.cli import local_state_dir
from tools.dev_keys import DevKeys
from tools.stack import (
    GRPC_PORTS,
    METRICS_PORTS,
    READY_TIMEOUT_S,
    ROOT,
    SystemStack,
    infrastructure,
    spawn_service,
    start_sandbox,
)

STATE = local_state_dir()
LOCAL_BIND_HOST = "127.0.0.1"


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
    names = [*GRPC_PORTS, "gateway"]
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
    for name, port in GRPC_PORTS.items():
        env.setdefault(f"{name.upper()}_ADDR", f"{host}:{port}")
    return bind_host


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


async def start_services(stack: SystemStack, env: dict[str, str], bind_host: str) -> None:
    """Each service in turn, callees before their callers, each ready before the next starts;
    raises RuntimeError when one exits or is not ready in time."""
    host = reachable_host(bind_host)
    for name in existing_services():
        if name == "gateway":
            port = int(env["HTTP_PORT"])
            service_env = env
        else:
            port = int(env[f"{name.upper()}_ADDR"].rpartition(":")[2])
            service_env = {**env, "METRICS_PORT": str(METRICS_PORTS[name])}
        stack.services[name] = service = spawn_service(
            name, service_env, port=port, http=name == "gateway", host=host, to_terminal=True
        )
        await service.wait_ready(READY_TIMEOUT_S)
        if name == "gateway":
            say(f"gateway        http://{bind_host}:{port}  (public {env['PUBLIC_BASE_URL']})")
        else:
            metrics = f"{bind_host}:{METRICS_PORTS[name]}"
            say(f"{name:<14} grpc {bind_host}:{port}  metrics {metrics}")


def main() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    try:
        hold_run_lock(STATE)
    except AlreadyRunningError as error:
        print(error, file=sys.stderr)
        return 1
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    signal.signal(signal.SIGINT, lambda *_: stop_requested.set())
    env = dict(os.environ)
    credentials = dev_credentials()
    # One signing key per identity in .state/keys/, created once; each service gets its own.
    keys = DevKeys(STATE / "keys")
    env.setdefault("SNAPSELL_TRUSTED_KEYS_FILE", str(keys.trusted_keys_file))
    bind_host = set_listen_addresses(env)

    with ExitStack() as cleanup:
        found = cleanup.enter_context(
            infrastructure(
                STATE,
                keep=True,
                postgres_port=int(env.get("PGPORT", "55432")),
                nats_port=int(env.get("NATS_PORT", "54222")),
            )
        )
        env["DATABASE_URL"], env["NATS_URL"] = found.dsn, found.nats_url
        if found.postgres:
            say(f"PostgreSQL 18 (embedded) at {found.dsn}")
        if found.nats:
            say(
                f"NATS JetStream (embedded) at nats://{found.nats.address}"
                f" (user admin, password in {STATE / 'nats' / 'admin.password'})"
            )
        stack = SystemStack(
            found.dsn,
            found.nats_url,
            keys,
            STATE,
            credentials["TWILIO_ACCOUNT_SID"],
            credentials["TWILIO_AUTH_TOKEN"],
            int(env["HTTP_PORT"]),
        )
        return asyncio.run(run_stack(stack, env, bind_host, stop_requested))


async def run_stack(
    stack: SystemStack, env: dict[str, str], bind_host: str, stop_requested: threading.Event
) -> int:
    """Start the sandbox (unless real Twilio credentials are configured) and the services, then
    watch them until Ctrl-C / SIGTERM or until a service exits; stop everything on the way out."""
    try:
        real_twilio = (
            env.get("TWILIO_ACCOUNT_SID")
            and env.get("TWILIO_AUTH_TOKEN")
            and not env.get("TWILIO_API_BASE_URL")
        )
        if not real_twilio:
            env["TWILIO_ACCOUNT_SID"] = stack.account_sid
            env["TWILIO_AUTH_TOKEN"] = stack.auth_token
            port = int(env.get("TWILIO_SANDBOX_PORT", "8089"))
            stack.sandbox = await start_sandbox(
                {stack.account_sid: stack.auth_token}, port=port, to_terminal=True
            )
            env["TWILIO_API_BASE_URL"] = stack.sandbox.url
            say(f"Twilio sandbox at {stack.sandbox.url} (account {stack.account_sid})")
        await start_services(stack, env, bind_host)
    except RuntimeError as error:
        say(f"failed to start: {error}")
        await stack.stop()
        return 1
    say("ready — Ctrl-C stops everything")
    try:
        while not stop_requested.is_set():
            exited = stack.first_exit()
            if exited:
                say(f"{exited[0]} exited with {exited[1]}; stopping the stack")
                return 1
            await asyncio.sleep(0.5)
        say("stopping")
        return 0
    finally:
        await stack.stop()


if __name__ == "__main__":
    sys.exit(main())
