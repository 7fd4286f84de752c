"""`make run` and `make webhook` fail in one friendly line, and the local stack listens where it
says: a second `make run` names the PID that runs before starting anything, `make webhook` with
the stack down says so, every listener binds `BIND_HOST` (loopback under `make run`)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.config import ConfigError, env_bind_host
from infra.grpc_server import GrpcServer
from infra.metrics import start_metrics_server
from tests.support.gateway import start_gateway
from tools.devstack import free_port
from tools.run import hold_run_lock, set_listen_addresses
from tools.stack import ROOT


def _run(module: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def listening_hosts(port: int) -> set[str]:
    """The addresses something listens on at `port` (/proc/net/tcp and tcp6; an IPv4-mapped
    IPv6 address, as gRPC binds, is given as IPv4)."""
    hosts = set()
    for table in ("tcp", "tcp6"):
        for line in Path("/proc/net", table).read_text().splitlines()[1:]:
            columns = line.split()
            address, _, hex_port = columns[1].partition(":")
            if columns[3] != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(packed)
            mapped = getattr(ip, "ipv4_mapped", None)
            hosts.add(str(mapped or ip))
    return hosts


# --- make run: one per state directory --------------------------------------------------------


def test_a_second_make_run_names_the_running_pid_and_starts_nothing(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from tools.run import hold_run_lock; "
            "hold_run_lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        second = _run("tools.run", {"SNAPSELL_STATE_DIR": str(tmp_path)})
        assert second.returncode == 1
        assert second.stderr == f"make run is already running (PID {holder.pid})\n"
        assert second.stdout == ""
        assert time.monotonic() - started < 10
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pid"]  # no postgres, no keys
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def test_a_pid_file_left_by_a_dead_make_run_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / "run.pid").write_text("999999999\n")
    fd = hold_run_lock(tmp_path)
    try:
        assert (tmp_path / "run.pid").read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)


# --- make webhook -------------------------------------------------------------------------------


def test_make_webhook_with_the_stack_down_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "dev-credentials.json").write_text(
        json.dumps({"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "f" * 32})
    )
    url = f"http://127.0.0.1:{free_port()}"
    done = _run("tools.send_webhook", {"SNAPSELL_STATE_DIR": str(tmp_path), "PUBLIC_BASE_URL": url})
    assert done.returncode == 1
    assert done.stderr == f"gateway not reachable at {url} — is `make run` up?\n"
    assert done.stdout.startswith("MessageSid SM")


# --- where the stack listens ------------------------------------------------------------------


def test_make_run_binds_loopback_unless_bind_host_is_set() -> None:
    env: dict[str, str] = {}
    assert set_listen_addresses(env) == "127.0.0.1"
    assert env["BIND_HOST"] == "127.0.0.1"
    assert env["PUBLIC_BASE_URL"] == "http://127.0.0.1:8080"
    assert env["ROUTING_ADDR"] == "127.0.0.1:50051"

    chosen = {"BIND_HOST": "0.0.0.0"}
    assert set_listen_addresses(chosen) == "0.0.0.0"
    assert chosen["SELLER_ADMIN_ADDR"] == "127.0.0.1:50054"  # a wildcard is reached on loopback


def test_bind_host_must_be_an_ip_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIND_HOST", raising=False)
    assert env_bind_host() == "0.0.0.0"  # the images' default: a pod is reached on its IP
    monkeypatch.setenv("BIND_HOST", "localhost:80")
    with pytest.raises(ConfigError, match="BIND_HOST must be an IP address"):
        env_bind_host()


async def test_grpc_and_metrics_servers_bind_bind_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIND_HOST", "127.0.0.1")
    server = GrpcServer(0, ())
    await server.start()
    metrics = start_metrics_server(0)
    try:
        assert listening_hosts(server.bound_port) == {"127.0.0.1"}
        assert listening_hosts(metrics.port) == {"127.0.0.1"}
    finally:
        metrics.stop()
        await server.stop(0)


async def test_the_gateway_binds_bind_host(nats_url: str) -> None:
    gateway = await start_gateway(nats_url, BIND_HOST="127.0.0.1")
    try:
        assert listening_hosts(gateway.port) == {"127.0.0.1"}
    finally:
        assert gateway.stop() == 0, gateway.logs()
