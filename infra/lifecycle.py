"""Process lifecycle shared by every service's `__main__.py`.

    def main() -> None:
        run_main(serve, service="routing")   # serve(stop: asyncio.Event) -> None

`run_main` sets up JSON logging and tracing, runs `serve` on uvloop with an Event that SIGTERM
or SIGINT sets (a second signal cancels `serve`), and exits 2 with one line on stderr when the
configuration is wrong, 1 when `serve` crashes, 0 after a clean stop.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import uvloop

from infra.config import ConfigError
from infra.log import get_logger, setup_logging
from infra.telemetry import setup_tracing

_log = get_logger(__name__)


async def _serve(main: Callable[[asyncio.Event], Awaitable[None]], service: str) -> None:
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
    provider = setup_tracing(service)
    _log.info("service.starting")
    try:
        await main(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if provider is not None:
            provider.shutdown()
    _log.info("service.stopped")


def run_main(main: Callable[[asyncio.Event], Awaitable[None]], *, service: str) -> None:
    try:
        setup_logging(service)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(main, service))
    except ConfigError as error:
        print(f"{service}: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    except asyncio.CancelledError:
        sys.exit(130)
    except Exception:
        _log.exception("service.crashed")
        sys.exit(1)
