"""The background tasks of a service (consumers, event relay, sweepers, retention) and the one
crash policy they all follow.

    tasks = BackgroundTasks(SERVICE, {"event-relay": lambda: relay.run(stop), ...}, stop,
                            on_health=server.set_serving)
    tasks.start()
    await stop.wait()
    await server.stop(grace)
    await tasks.stop(grace)      # raises BackgroundTaskFailed if a task gave up

(what every gRPC service does through `infra.grpc_service.serve_until_stopped`).

Each task runs until `stop` is set. A task that raises, or returns while `stop` is not set, has
crashed:
- it is logged (`<service>.task_crashed`, with the exception) and started again after a pause
  that doubles from `restart_pause_s` up to `max_pause_s`;
- from its crash until it has run `stable_s` without crashing again, the service is unready:
  `on_health(False)` (the gRPC health status goes NOT_SERVING), so probes and health-checking
  clients stop sending it work it cannot finish; `on_health(True)` once every task is back;
- if it is still crashing `give_up_after_s` after the first crash of the streak, the supervisor
  logs `<service>.task_gave_up`, sets `stop` (the process drains as on SIGTERM) and `stop()`
  raises, so the process exits non-zero and the orchestrator restarts it.

Data stays safe through all of this: messages are acked and events published only after their
transaction committed, so whatever a crashed task had in hand comes back (JetStream redelivers
after AckWait; unpublished events stay in the service's table).

Settings (environment): `BACKGROUND_GIVE_UP_AFTER_S` (default 300).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from infra.config import env_float
from infra.log import get_logger

_log = get_logger(__name__)

TASK_RESTARTS = Counter(
    "snapsell_background_task_restarts_total",
    "Background tasks started again after a crash",
    ["service", "task"],
)
TASKS_DOWN = Gauge(
    "snapsell_background_tasks_down",
    "Background tasks crashed and not yet stable again (the service is unready while > 0)",
    ["service"],
)

Task = Callable[[], Awaitable[None]]


class BackgroundTaskFailed(RuntimeError):
    def __init__(self, task: str) -> None:
        super().__init__(f"background task {task} kept crashing")
        self.task = task


@dataclass(frozen=True)
class CrashPolicy:
    restart_pause_s: float = 1.0
    max_pause_s: float = 30.0
    stable_s: float = 30.0
    give_up_after_s: float = 300.0

    @classmethod
    def from_env(cls) -> CrashPolicy:
        return cls(
            give_up_after_s=env_float(
                "BACKGROUND_GIVE_UP_AFTER_S", cls.give_up_after_s, minimum=1.0, maximum=86_400.0
            )
        )

    def pause_s(self, crashes: int) -> float:
        """The pause before the restart that follows the `crashes`-th crash of a streak."""
        return min(self.max_pause_s, self.restart_pause_s * 2.0 ** min(crashes - 1, 32))


class BackgroundTasks:
    def __init__(
        self,
        service: str,
        tasks: Mapping[str, Task],
        stop: asyncio.Event,
        *,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        policy: CrashPolicy | None = None,
    ) -> None:
        self._service = service
        self._tasks = dict(tasks)
        self._stop = stop
        self._on_health = on_health
        self._policy = policy if policy is not None else CrashPolicy.from_env()
        self._down: set[str] = set()
        self._failed: str | None = None
        self._running: list[asyncio.Task[None]] = []

    @property
    def down(self) -> frozenset[str]:
        """The tasks crashed and not yet stable again."""
        return frozenset(self._down)

    def start(self) -> None:
        TASKS_DOWN.labels(self._service).set(0)
        self._running = [
            asyncio.create_task(self._supervise(name, task), name=name)
            for name, task in self._tasks.items()
        ]

    async def stop(self, grace_s: float) -> None:
        """After `stop` is set: let the tasks finish their batch within `grace_s`, cancel the
        rest (e.g. a relay stuck on an unreachable NATS); raise if one gave up."""
        self._stop.set()
        if self._running:
            _, pending = await asyncio.wait(self._running, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._failed is not None:
            raise BackgroundTaskFailed(self._failed)

    async def _supervise(self, name: str, task: Task) -> None:
        policy = self._policy
        crashes = 0
        streak_started = 0.0
        while not self._stop.is_set():
            attempt = asyncio.ensure_future(task())
            error: BaseException | None = None
            try:
                if crashes:
                    done, _ = await asyncio.wait({attempt}, timeout=policy.stable_s)
                    if not done:
                        crashes = 0
                        await self._mark(name, down=False)
                await attempt
            except asyncio.CancelledError:  # stop() past its grace
                attempt.cancel()
                raise
            except Exception as exc:
                error = exc
            if self._stop.is_set():
                if error is not None:
                    _log.warning(
                        f"{self._service}.task_failed_stopping",
                        extra={"fields": {"task": name, "error": repr(error)}},
                    )
                return
            crashes += 1
            now = time.monotonic()
            if crashes == 1:
                streak_started = now
            _log.error(
                f"{self._service}.task_crashed",
                exc_info=error,
                extra={"fields": {"task": name, "crashes": crashes, "error": repr(error)}},
            )
            await self._mark(name, down=True)
            if now - streak_started >= policy.give_up_after_s:
                _log.error(
                    f"{self._service}.task_gave_up",
                    extra={"fields": {"task": name, "crashes": crashes}},
                )
                self._failed = self._failed or name
                self._stop.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=policy.pause_s(crashes))
            if not self._stop.is_set():
                TASK_RESTARTS.labels(self._service, name).inc()

    async def _mark(self, name: str, *, down: bool) -> None:
        was_ready = not self._down
        if down:
            self._down.add(name)
        else:
            self._down.discard(name)
        TASKS_DOWN.labels(self._service).set(len(self._down))
        ready = not self._down
        if ready != was_ready and self._on_health is not None:
            await self._on_health(ready)
