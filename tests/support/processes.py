"""Run a service as its own process, exactly as `make run` does, and stop it by PID.

The code lives in `tools.service_process`, shared with the benchmarks (tools/ never imports
tests/); the names stay importable from here.
"""

from __future__ import annotations

from tools.devstack import free_port
from tools.service_process import (
    READY_TIMEOUT_S,
    ROOT,
    RunningService,
    restart,
    spawn_service,
    start_service,
)

__all__ = [
    "READY_TIMEOUT_S",
    "ROOT",
    "RunningService",
    "free_port",
    "restart",
    "spawn_service",
    "start_service",
]
