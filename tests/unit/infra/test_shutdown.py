"""`Shutdown` closes what a service opened in the reverse order, every step whatever the others
did, each async step bounded by its timeout; the first failure is raised once all have run."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from infra.shutdown import Shutdown


def recorder(
    closed: list[str], name: str, *, error: BaseException | None = None
) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        closed.append(name)
        if error is not None:
            raise error

    return close


async def test_steps_close_in_the_reverse_order_of_adding() -> None:
    closed: list[str] = []
    async with Shutdown() as shutdown:
        shutdown.add("database", recorder(closed, "database"))
        shutdown.add("nats", recorder(closed, "nats"))
        shutdown.add("metrics", lambda: closed.append("metrics"))  # a sync step
        shutdown.add("server", recorder(closed, "server"))
        assert closed == []
    assert closed == ["server", "metrics", "nats", "database"]


async def test_a_failing_step_does_not_skip_the_others_and_is_raised_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed: list[str] = []
    shutdown = Shutdown()
    shutdown.add("database", recorder(closed, "database"))
    shutdown.add("nats", recorder(closed, "nats", error=ConnectionError("nats gone")))
    shutdown.add("tasks", recorder(closed, "tasks", error=RuntimeError("task gave up")))
    shutdown.add("server", recorder(closed, "server"))
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError, match="task gave up"):
        await shutdown.close()
    assert closed == ["server", "tasks", "nats", "database"]
    failed = [r.fields["step"] for r in caplog.records if r.getMessage() == "service.close_failed"]
    done = [r.fields["step"] for r in caplog.records if r.getMessage() == "service.closed"]
    assert failed == ["tasks", "nats"]
    assert done == ["server", "database"]


async def test_a_step_past_its_timeout_is_cancelled_and_the_rest_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed: list[str] = []
    cancelled = asyncio.Event()

    async def hangs() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    shutdown = Shutdown(default_timeout_s=5.0)
    shutdown.add("database", recorder(closed, "database"))
    shutdown.add("pool", hangs, timeout_s=0.05)
    shutdown.add("server", recorder(closed, "server"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.INFO), pytest.raises(TimeoutError):
        await shutdown.close()
    assert loop.time() - started < 2.0
    assert cancelled.is_set()
    assert closed == ["server", "database"]
    timed_out = [r for r in caplog.records if r.getMessage() == "service.close_timed_out"]
    assert [(r.fields["step"], r.fields["timeout_s"]) for r in timed_out] == [("pool", 0.05)]


async def test_the_default_timeout_bounds_a_step_that_sets_none() -> None:
    shutdown = Shutdown(default_timeout_s=0.05)
    shutdown.add("hangs", lambda: asyncio.sleep(3))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await shutdown.close()
    assert loop.time() - started < 1.0


async def test_an_exception_of_the_block_wins_over_the_steps_failures() -> None:
    closed: list[str] = []
    with pytest.raises(ValueError, match="bad start"):
        async with Shutdown() as shutdown:
            shutdown.add("database", recorder(closed, "database"))
            shutdown.add("nats", recorder(closed, "nats", error=ConnectionError("nats gone")))
            raise ValueError("bad start")
    assert closed == ["nats", "database"]


async def test_a_forced_stop_cancels_the_running_step_and_the_later_ones_still_run() -> None:
    closed: list[str] = []
    draining = asyncio.Event()

    async def drains() -> None:
        draining.set()
        await asyncio.sleep(60)

    shutdown = Shutdown()
    shutdown.add("database", recorder(closed, "database"))
    shutdown.add("server", drains)
    closing = asyncio.create_task(shutdown.close())
    await draining.wait()
    closing.cancel()  # what a second SIGTERM does to `serve`
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert closed == ["database"]


async def test_steps_run_once() -> None:
    closed: list[str] = []
    shutdown = Shutdown()
    shutdown.add("database", recorder(closed, "database"))
    await shutdown.close()
    await shutdown.close()
    assert closed == ["database"]
