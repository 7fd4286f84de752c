"""Several gateway processes behind one port, so a pod uses every core it is given.

One Python process answers webhooks on one core; `GATEWAY_WORKERS=N` makes
`python -m services.gateway` a small supervisor of N ordinary gateway processes. Each binds the
port with `SO_REUSEPORT`, so the kernel spreads connections over them, and has its own NATS
connection. Their Prometheus metrics are written to a shared directory
(`PROMETHEUS_MULTIPROC_DIR`, prometheus_client's multiprocess mode) and `/metrics` on any of
them answers for all. A worker that dies is started again after a pause, unless it stopped on a
configuration error (one the supervisor does not read itself, such as the tracing variables):
every restart would meet it again, so the supervisor stops the others and exits with the same
code, and the pod shows the worker's one-line message. SIGTERM or SIGINT is passed on to every
worker, which drains as a single gateway does, then the supervisor exits.

The supervisor imports this module, the configuration and the logger only: whether to supervise
is decided in `__main__.py` before the app is imported, so the supervisor stays small (~17 MB
resident instead of ~60) and a pod's memory is mostly its workers'.

Limits are counted per worker (signature failures per source IP, messages per sender), as
they are per replica: the effective limit of a pod is at most N times the configured one.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from infra.config import CONFIGURATION_ERROR_EXIT, ConfigError
from infra.log import get_logger, setup_logging
from services.gateway.config import load_config

_log = get_logger(__name__)

WORKER_ENV = "GATEWAY_WORKER"  # set by the supervisor in each worker's environment
RESTART_PAUSE_S = 1.0
STOP_GRACE_S = 20.0
POLL_S = 0.2
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


class Supervisor:
    def __init__(self, count: int) -> None:
        self._count = count
        self._metrics_dir = tempfile.mkdtemp(prefix="snapsell-gateway-metrics-")
        self._env = {
            **os.environ,
            WORKER_ENV: "1",
            "GATEWAY_WORKERS": "1",
            "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir,
        }
        self._workers: list[subprocess.Popen[bytes] | None] = [None] * count
        self._stopping = False

    def _start(self, slot: int) -> None:
        # Own process group: a terminal's Ctrl-C reaches the supervisor only, which passes one
        # SIGTERM on (a second signal would cut a worker's drain short).
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway"],
            env=self._env,
            process_group=0,
            preexec_fn=_die_with_parent,
        )
        self._workers[slot] = proc
        _log.info("gateway.worker_started", extra={"fields": {"slot": slot, "pid": proc.pid}})

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for slot in range(self._count):
                self._start(slot)
            return self._watch()
        finally:
            self._stop_all()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _watch(self) -> int:
        """0 once asked to stop; CONFIGURATION_ERROR_EXIT when a worker stopped on one."""
        restart_at: dict[int, float] = {}
        while not self._stopping:
            for slot, proc in enumerate(self._workers):
                if proc is not None and proc.poll() is not None:
                    _log.error(
                        "gateway.worker_exited",
                        extra={"fields": {"slot": slot, "pid": proc.pid, "code": proc.returncode}},
                    )
                    _forget_metrics_of(proc.pid, self._metrics_dir)
                    self._workers[slot] = None
                    if proc.returncode == CONFIGURATION_ERROR_EXIT:
                        return CONFIGURATION_ERROR_EXIT
                    restart_at[slot] = time.monotonic() + RESTART_PAUSE_S
            for slot, at in list(restart_at.items()):
                if time.monotonic() >= at:
                    del restart_at[slot]
                    self._start(slot)
            time.sleep(POLL_S)
        return 0

    def _stop_all(self) -> None:
        running = [p for p in self._workers if p is not None and p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _die_with_parent() -> None:
    """In the forked worker: SIGTERM when the supervisor dies, even by SIGKILL (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _forget_metrics_of(pid: int, metrics_dir: str) -> None:
    # Imported on a worker's death only: prometheus_client weighs ~12 MB.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)


def supervise_when_configured(argv: list[str]) -> None:
    """With `GATEWAY_WORKERS` > 1 and the `serve` command, supervise that many gateway processes
    and exit with the supervisor's code; otherwise (a worker, one process, another command, or a
    configuration error, which the serving path then reports) return."""
    if is_worker() or argv not in ([], ["serve"]):
        return
    try:
        workers = load_config().workers
    except ConfigError:
        return
    if workers > 1:
        setup_logging("gateway")
        sys.exit(Supervisor(workers).run())
