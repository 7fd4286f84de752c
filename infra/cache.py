"""A read-through cache of another service's answers: kept for a TTL, loaded once at a time.

`LoadingCache` keeps what a loader returned for a key until the TTL (counted from when the
load started) or an invalidation, whichever comes first; the TTL bounds staleness when the
invalidating events are missed (e.g. during a NATS outage). Concurrent misses of one key wait
for the same load. A load that started before an invalidation answers its caller but is not
kept (it may predate the change). A loader's None ("no such thing") is never kept, so what is
created a moment later is found at once. A hit is one dict look-up and a clock read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LoadingCache(Generic[K, V]):
    def __init__(
        self,
        *,
        ttl_s: float,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[K, tuple[V, float]] = {}
        self._loading: dict[K, asyncio.Future[V | None]] = {}
        self._generation = 0

    def cached(self, key: K) -> V | None:
        """The kept value, when there is one and it has not expired."""
        entry = self._entries.get(key)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def get(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """The kept value, else what `load()` returns (a load already under way is joined)."""
        value = self.cached(key)
        if value is not None:
            return value
        return await self.load(key, load)

    async def load(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """What `load()` returns, kept as `get` keeps it, whatever is kept now (for a caller
        that found the kept value wanting); a load already under way is joined."""
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._load(key, load))
            self._loading[key] = loading
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(loading)

    def invalidate(self, key: K) -> None:
        self._entries.pop(key, None)
        self._generation += 1

    def invalidate_all(self) -> None:
        self._entries.clear()
        self._generation += 1

    async def _load(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        generation, started = self._generation, self._clock()
        value = await load()
        if value is not None and generation == self._generation:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = (value, started + self._ttl_s)
        return value
