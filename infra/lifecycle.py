"""Process lifecycle shared by every service's `__main__.py`.

    def main() -> None:
        run_main(serve, service="routing")   # serve(stop: asyncio.Event) -> None

`run_main` sets up JSON logging and tracing, runs `serve` on uvloop with an Event that SIGTERM
or SIGINT sets (a second signal cancels `serve`), and exits 2 with one line on stderr when the
configuration is wrong, 1 when `serve` crashes, 0 after a clean stop. Every service calls
`tune_garbage_collector()` once started. The command line around it: `infra.entrypoint`; the
background tasks inside `serve`: `infra.supervisor`.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn

import uvloop

from infra.config import CONFIGURATION_ERROR_EXIT, ConfigError
from infra.log import get_logger, setup_logging
from infra.telemetry import setup_tracing

_log = get_logger(__name__)
# The young generation is collected after this many allocations (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """For a process that is started and about to serve: a send or a webhook allocates
    hundreds of short-lived objects that reference counting frees anyway. With the default
    thresholds the collector ran ~2,000 times per 20,000 outbox sends and found next to
    nothing, and its full collections walked everything startup left (modules, the Twilio SDK,
    protobuf descriptors): ~15% of the outbox's CPU and pauses of 50-70 ms. Freezing what exists
    after startup and collecting less often removes both; cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


async def _serve(
    main: Callable[[asyncio.Event], Awaitable[None]], service: str, database: bool
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set() and main_task is not None:
            _log.warning("service.forced_stop", extra={"fields": {"signal": signum.name}})
            main_task.cancel()
            return
        _log.info("service.stopping", extra={"fields": {"signal": signum.name}})
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    provider = setup_tracing(service, database=database)
    _log.info("service.starting")
    try:
        await main(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if provider is not None:
            provider.shutdown()
    _log.info("service.stopped")


def exit_configuration_error(service: str, error: ConfigError) -> NoReturn:
    print(f"{service}: configuration error: {error}", file=sys.stderr)
    sys.exit(CONFIGURATION_ERROR_EXIT)


def run_main(
    main: Callable[[asyncio.Event], Awaitable[None]], *, service: str, database: bool = True
) -> None:
    """`database`: the service queries PostgreSQL (its queries are traced); the gateway does not."""
    try:
        setup_logging(service)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(main, service, database))
    except ConfigError as error:
        exit_configuration_error(service, error)
    except asyncio.CancelledError:
        sys.exit(130)
    except Exception:
        _log.exception("service.crashed")
        sys.exit(1)
