"""A storm of NOTIFYs wakes a listener once: the calls made within the debounce window after
the first join its wake-up; a call after the wake-up starts a new one."""

from __future__ import annotations

import asyncio

from infra.events import DebouncedWakeup


async def test_a_storm_of_calls_within_the_window_sets_the_event_once() -> None:
    event = asyncio.Event()
    wakeups: list[float] = []
    loop = asyncio.get_running_loop()

    async def count() -> None:
        while True:
            await event.wait()
            wakeups.append(loop.time())
            event.clear()

    counter = asyncio.create_task(count())
    notify = DebouncedWakeup(event, delay_s=0.05)
    try:
        first = loop.time()
        for _ in range(20):
            notify(None, 1, "outbox_due", "")
            await asyncio.sleep(0.001)
        assert not event.is_set() and wakeups == []
        await asyncio.sleep(0.1)
        assert len(wakeups) == 1 and wakeups[0] - first >= 0.05
        notify()
        await asyncio.sleep(0.1)
        assert len(wakeups) == 2
    finally:
        counter.cancel()


async def test_a_cancelled_wakeup_never_fires() -> None:
    event = asyncio.Event()
    notify = DebouncedWakeup(event, delay_s=0.01)
    notify()
    notify.cancel()
    await asyncio.sleep(0.05)
    assert not event.is_set()
