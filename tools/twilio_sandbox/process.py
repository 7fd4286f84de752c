"""Start the sandbox as a child process on a free port (for tests, `make run` and benchmarks)."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PROJECT_ROOT = Path(__file__).resolve().parents[2]
READY_PREFIX = "twilio sandbox listening on "


class SandboxStartError(RuntimeError):
    """The sandbox process exited or stayed silent instead of reporting its address."""


@dataclass
class SandboxProcess:
    process: subprocess.Popen[str]
    url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_sandbox(
    accounts: Mapping[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    stderr: IO[str] | int | None = None,
    startup_timeout_s: float = 15.0,
) -> SandboxProcess:
    """Run `python -m tools.twilio_sandbox` and wait for its "listening" line."""
    env = dict(os.environ)
    # Tokens go through the environment, not argv, so they never show in a process list.
    env["TWILIO_AUTH_TOKENS"] = ",".join(f"{sid}={token}" for sid, token in accounts.items())
    env.pop("TWILIO_ACCOUNT_SID", None)
    env.pop("TWILIO_AUTH_TOKEN", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.twilio_sandbox", "--host", host, "--port", str(port)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )
    sandbox = SandboxProcess(process, url="")
    try:
        sandbox.url = _read_address(process, startup_timeout_s)
    except BaseException:
        sandbox.stop()
        raise
    return sandbox


def _read_address(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if selector.select(remaining):
                line = process.stdout.readline()
                if line.startswith(READY_PREFIX):
                    return line[len(READY_PREFIX) :].strip()
                if not line:
                    raise SandboxStartError(f"twilio sandbox exited with {process.wait()}")
    raise SandboxStartError(f"twilio sandbox did not start within {timeout_s:g}s")
