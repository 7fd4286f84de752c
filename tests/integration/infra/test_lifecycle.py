"""`run_main` and `run_service` as real processes: exit codes, commands, signals, logs, and a
trace that crosses a gRPC hop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def start(
    tmp_path: Path, body: str, *, argv: Sequence[str] = (), **env: str
) -> subprocess.Popen[str]:
    script = tmp_path / "service_main.py"
    script.write_text(
        "import os\nfrom infra.config import ConfigError\nfrom infra.lifecycle import run_main\n"
        + body
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SNAPSELL_"))}
    environment.update({"PYTHONPATH": str(ROOT), "LOG_LEVEL": "INFO", **env})
    return subprocess.Popen(
        [sys.executable, str(script), *argv],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, list[dict], str]:
    try:
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, [json.loads(line) for line in stdout.splitlines()], stderr


def test_configuration_error_exits_2_with_one_line(tmp_path: Path) -> None:
    process = start(
        tmp_path,
        "async def main(stop):\n    raise ConfigError('NATS_URL is required')\n"
        "run_main(main, service='routing')\n",
    )
    code, _, stderr = finish(process)
    assert (code, stderr) == (2, "routing: configuration error: NATS_URL is required\n")


def test_bad_log_level_is_a_configuration_error(tmp_path: Path) -> None:
    process = start(
        tmp_path,
        "async def main(stop):\n    pass\nrun_main(main, service='outbox')\n",
        LOG_LEVEL="CHATTY",
    )
    code, _, stderr = finish(process)
    assert code == 2 and stderr.startswith("outbox: configuration error: LOG_LEVEL")


def test_sigterm_sets_the_stop_event_and_the_process_exits_cleanly(tmp_path: Path) -> None:
    process = start(
        tmp_path,
        "import sys\n"
        "async def main(stop):\n"
        "    print('ready', file=sys.stderr, flush=True)\n"
        "    await stop.wait()\n"
        "    print('drained', file=sys.stderr, flush=True)\n"
        "run_main(main, service='live_session')\n",
    )
    assert process.stderr is not None
    assert process.stderr.readline() == "ready\n"
    process.send_signal(signal.SIGTERM)
    code, lines, stderr = finish(process)
    assert code == 0 and stderr == "drained\n"
    events = [line["event"] for line in lines]
    assert events == ["service.starting", "service.stopping", "service.stopped"]
    assert {line["service"] for line in lines} == {"live_session"}


def test_crash_is_logged_and_exits_1(tmp_path: Path) -> None:
    process = start(
        tmp_path,
        "async def main(stop):\n    raise RuntimeError('bug for +33612345678')\n"
        "run_main(main, service='routing')\n",
    )
    code, lines, _ = finish(process)
    assert code == 1
    crash = lines[-1]
    assert crash["event"] == "service.crashed"
    assert "RuntimeError: bug for +33******78" in crash["exception"]


TRACED_CALL = """
import json, os, sys
from infra.grpc_client import service_channel
from infra.telemetry import grpc_server_interceptors
from tests.integration.infra.grpc_echo import (
    AUDIENCE, KEYS, echo_server, echo_verifier, method, running,
)

os.environ.update(KEYS.env("routing"))

async def main(stop):
    tracing = tuple(grpc_server_interceptors())
    server = echo_server(echo_verifier(), extra_interceptors=tracing)
    async with running(server):
        address = f"127.0.0.1:{server.bound_port}"
        async with service_channel(address, audience=AUDIENCE) as channel:
            reply = await channel.unary_unary(method("WhoAmI"))(b"")
    print(reply.decode(), file=sys.stderr)

run_main(main, service="routing")
"""


def test_trace_context_crosses_a_grpc_call_into_the_span_file(tmp_path: Path) -> None:
    trace_file = tmp_path / "spans.jsonl"
    process = start(tmp_path, TRACED_CALL, SNAPSELL_TRACE_FILE=str(trace_file))
    code, _, stderr = finish(process)
    assert code == 0, stderr
    # gRPC's C core may log to stderr too (e.g. a GOAWAY at shutdown): take the reply line.
    reply = json.loads(next(line for line in stderr.splitlines() if line.startswith("{")))
    assert (reply["sub"], reply["role"], reply["has_traceparent"]) == ("routing", "service", True)

    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    [client] = [s for s in spans if s["kind"] == "CLIENT"]
    [server] = [s for s in spans if s["kind"] == "SERVER"]
    assert server["trace_id"] == client["trace_id"]
    assert server["parent_id"] == client["span_id"]
    assert server["name"] == client["name"] == "/test.v1.EchoService/WhoAmI"
    assert {client["service"], server["service"]} == {"routing"}


def test_without_an_exporter_nothing_is_traced(tmp_path: Path) -> None:
    process = start(tmp_path, TRACED_CALL)
    code, _, stderr = finish(process)
    assert code == 0, stderr
    assert json.loads(stderr)["has_traceparent"] is False


ENTRYPOINT = """
import sys
from infra.entrypoint import run_service

async def serve(stop):
    print('served', file=sys.stderr)

def before_serve():
    if 'GATEWAY_WORKERS' in os.environ:
        raise ConfigError('GATEWAY_WORKERS must be at least 1')
    return None

run_service('gateway', sys.argv[1:], serve=serve, before_serve=before_serve)
"""


@pytest.mark.parametrize("argv", [(), ("serve",)])
def test_serve_is_the_default_command(tmp_path: Path, argv: tuple[str, ...]) -> None:
    code, _, stderr = finish(start(tmp_path, ENTRYPOINT, argv=argv))
    assert (code, stderr) == (0, "served\n")


@pytest.mark.parametrize("argv", [("migrate",), ("serve", "now"), ("sevre",)])
def test_other_commands_print_the_usage_and_exit_2(tmp_path: Path, argv: tuple[str, ...]) -> None:
    code, _, stderr = finish(start(tmp_path, ENTRYPOINT, argv=argv))
    # The gateway has no database, hence no `migrate`.
    assert (code, stderr) == (2, "usage: python -m services.gateway [serve]\n")


def test_a_configuration_error_before_serving_exits_2(tmp_path: Path) -> None:
    code, _, stderr = finish(start(tmp_path, ENTRYPOINT, GATEWAY_WORKERS="0"))
    assert (code, stderr) == (
        2,
        "gateway: configuration error: GATEWAY_WORKERS must be at least 1\n",
    )
