"""Periodic jobs of the live catalog: releasing lapsed holds and serving the waitlists."""

from __future__ import annotations

import asyncio
import contextlib

from infra.log import get_logger
from services.live_catalog.store import CatalogStore

_log = get_logger(__name__)


async def sweep_holds(store: CatalogStore, interval_s: float, stop: asyncio.Event) -> None:
    """Release lapsed holds and serve the waitlists, batch after batch, every `interval_s`."""
    while not stop.is_set():
        try:
            while not stop.is_set() and (await store.expire_holds())[0]:
                pass
        except Exception as error:
            _log.warning("live_catalog.sweep_failed", extra={"fields": {"error": str(error)}})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
