"""How a service's `serve()` closes what it opened: in the reverse order of opening, each step
bounded and logged, one failure not skipping the others.

    async with Shutdown() as shutdown:
        pool = await open_service_database(...)
        shutdown.add("database", pool.close)
        nats_client = await jetstream.connect(...)
        shutdown.add("nats", nats_client.close)
        ...
        await stop.wait()
    # on leaving the block (after a stop, or when a step of the start-up raised):
    # nats closed, then the database

Each step logs `service.closed` (or `service.close_failed`, `service.close_timed_out`). An
async step is cancelled past its `timeout_s` and counts as failed; a sync one (e.g. stopping
the metrics thread) is not bounded here. Once every step has run, the first failure is raised,
so the process exits non-zero (`BackgroundTaskFailed` from a task that gave up, a close that
hung); an exception of the block itself wins over the steps' failures, which are only logged.
A forced stop (a second SIGTERM cancels `serve`) cancels the step running then; the steps after
it still run, and the cancellation is raised at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from infra.log import get_logger

_log = get_logger(__name__)

# What an async close may take before it is cancelled, unless its step says otherwise; steps
# that drain (the gRPC server, the background tasks) get their grace period on top of it.
DEFAULT_STEP_TIMEOUT_S = 10.0

Close = Callable[[], object]


@dataclass(frozen=True)
class _Step:
    name: str
    close: Close
    timeout_s: float


class Shutdown:
    def __init__(self, *, default_timeout_s: float = DEFAULT_STEP_TIMEOUT_S) -> None:
        self._default_timeout_s = default_timeout_s
        self._steps: list[_Step] = []

    def add(self, name: str, close: Close, *, timeout_s: float | None = None) -> None:
        """Close with `close()` (a coroutine function or a plain one) before everything added
        earlier."""
        timeout = timeout_s if timeout_s is not None else self._default_timeout_s
        self._steps.append(_Step(name, close, timeout))

    async def close(self) -> None:
        """Run every step, the last added first; raise the first failure once all have run."""
        first_error: BaseException | None = None
        while self._steps:
            step = self._steps.pop()
            error = await _run(step)
            if first_error is None:
                first_error = error
        if first_error is not None:
            raise first_error

    async def __aenter__(self) -> Shutdown:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
            return
        # The steps' failures are logged by their step; the block's own exception wins.
        with contextlib.suppress(BaseException):
            await self.close()


async def _run(step: _Step) -> BaseException | None:
    started = time.monotonic()
    fields: dict[str, object] = {"step": step.name}
    try:
        result = step.close()
        if inspect.isawaitable(result):
            await asyncio.wait_for(result, timeout=step.timeout_s)
    except TimeoutError as error:
        _log.error(
            "service.close_timed_out", extra={"fields": {**fields, "timeout_s": step.timeout_s}}
        )
        return error
    except asyncio.CancelledError as error:
        _log.warning("service.close_failed", extra={"fields": {**fields, "error": "cancelled"}})
        return error
    except BaseException as error:  # whatever it is, the steps after it still run
        _log.error(
            "service.close_failed",
            exc_info=error,
            extra={"fields": {**fields, "error": repr(error)}},
        )
        return error
    elapsed_ms = round((time.monotonic() - started) * 1000)
    _log.info("service.closed", extra={"fields": {**fields, "ms": elapsed_ms}})
    return None
