"""Work waiting, measured the same way in every service: how much (`snapsell_queue_depth`) and
how long the oldest item has waited (`snapsell_queue_oldest_age_seconds`), by `queue`.

A queue is named `<STREAM>/<durable>` for a JetStream consumer (depth: its num_pending plus
num_ack_pending, as the server reports them, the figure KEDA scales on) and
`<service>.<table>` for rows a service's own loop works through. Depths read from the server
or the database are the same on every replica; ages observed by a replica are its own: a
dashboard or an alert takes `max` of both.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import Gauge

QUEUE_DEPTH = Gauge(
    "snapsell_queue_depth",
    "Items waiting to be handled, per queue (JetStream consumer or table)",
    ["queue"],
)
QUEUE_OLDEST_AGE = Gauge(
    "snapsell_queue_oldest_age_seconds",
    "How long the oldest item waiting has waited, per queue (0 when none waits)",
    ["queue"],
)


def report_queue(queue: str, depth: int, oldest_age_s: float) -> None:
    QUEUE_DEPTH.labels(queue).set(depth)
    QUEUE_OLDEST_AGE.labels(queue).set(max(0.0, oldest_age_s))


class InFlight:
    """Stream timestamps of the messages a consumer loop holds unsettled, exported as the age
    of the oldest. A pull consumer is delivered messages in stream order, so while it has a
    backlog the oldest it holds is the oldest its stream has waiting (a message naked with a
    delay waits outside it until its redelivery)."""

    def __init__(self, queue: str, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._held: dict[int, float] = {}
        self._tokens = itertools.count()
        QUEUE_OLDEST_AGE.labels(queue).set_function(self.oldest_age)

    @contextmanager
    def holding(self, stored_at: float) -> Iterator[None]:
        """While the block runs, count a message stored in its stream at `stored_at` (Unix s)."""
        token = next(self._tokens)
        self._held[token] = stored_at
        try:
            yield
        finally:
            del self._held[token]

    def oldest_age(self) -> float:
        held = self._held.copy().values()  # scrapes run on another thread: copy at once
        return max(0.0, self._clock() - min(held)) if held else 0.0
