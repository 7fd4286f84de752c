"""HTTP servers under test, run as `python -m <module>` child processes and stopped by PID.

Each server runs in its own session with its output in a log file, is considered up when
`GET /readyz` answers 200, and is stopped with SIGTERM (SIGKILL after a grace period); any
worker processes it forked that outlive it are then stopped by their own PIDs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tools.bench.rss import process_tree

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0


class ServerFailedError(RuntimeError):
    """The server exited or never became ready; the message carries its log's tail."""


class HttpServer:
    def __init__(self, module: str, port: int, env: dict[str, str], log: Path) -> None:
        self.module, self.port, self.log = module, port, log
        self._env = {**os.environ, **env, "HTTP_PORT": str(port)}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self) -> HttpServer:
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                cwd=ROOT,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        descendants = [pid for pid in process_tree(self._proc.pid) if pid != self._proc.pid]
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_ready(self) -> None:
        assert self._proc is not None
        # No proxies: an http_proxy in the environment must not intercept 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://127.0.0.1:{self.port}/readyz"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerFailedError(
                    f"{self.module} exited with code {self._proc.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(urllib.error.URLError, OSError):
                with opener.open(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            time.sleep(0.1)
        self.stop()
        raise ServerFailedError(
            f"{self.module} not ready in {READY_TIMEOUT_S:.0f}s:\n{self.log_tail()}"
        )
