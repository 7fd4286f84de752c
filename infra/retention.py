"""Retention: deleting old rows of high-churn tables in small batches, in the background.

A purge is one DELETE statement of the owning service that removes at most `batch_size` rows
older than a given age, chosen by primary key and `FOR UPDATE SKIP LOCKED` (`batched_delete`
writes it from the table, key and age column the service names):

    WITH doomed AS MATERIALIZED (
        SELECT id FROM t WHERE <finished> AND <at> < now() - $1::interval
        ORDER BY <at> LIMIT $2 FOR UPDATE SKIP LOCKED
    )
    DELETE FROM t WHERE id = ANY (ARRAY (SELECT id FROM doomed))

(`= ANY (ARRAY ...)`, not `IN (SELECT ...)`: the planner turns the latter into a hash join
over a sequential scan of the whole table.)

`delete_in_batches` runs it, each batch its own short transaction with a pause in between,
until a batch comes back short; so no lock is held for long, autovacuum and replicas keep up,
and two replicas purging at once take different rows instead of waiting on each other. The
cutoff uses the database clock, the one that wrote the timestamps. The statements (which rows
count as finished) belong to the services; only the events table, which is infra's, has its
purges here: delivery events after `EVENTS_RETENTION_DAYS`, audit-class events (those with an
actor, `infra.events.record_event`) after `AUDIT_RETENTION_DAYS`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from infra.config import ConfigError, env_float, env_int
from infra.events import wait_any
from infra.log import get_logger

if TYPE_CHECKING:  # the gateway imports this module's limits (infra.streams), not asyncpg
    import asyncpg

DEFAULT_INTERVAL_S = 3600.0
DEFAULT_BATCH_SIZE = 1000
DEFAULT_EVENTS_RETENTION_DAYS = 7
# Who changed what stays answerable for a year and a month after the change.
DEFAULT_AUDIT_RETENTION_DAYS = 400
# Long enough for other writers and autovacuum to get in between batches, short enough that
# a backlog of a million rows still clears in minutes.
DEFAULT_PAUSE_S = 0.05
MAX_RETENTION_DAYS = 3650


def batched_delete(table: str, key: str, age_column: str, *, where: str = "") -> str:
    """The purge statement of `table`: at most `$2` rows (that match `where`) whose
    `age_column` is older than the interval `$1`, oldest first, picked by `key`."""
    condition = f"{where} AND " if where else ""
    return f"""
WITH doomed AS MATERIALIZED (
    SELECT {key} FROM {table}
    WHERE {condition}{age_column} < now() - $1::interval
    ORDER BY {age_column}
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {table} WHERE {key} = ANY (ARRAY (SELECT {key} FROM doomed))
"""


# Published events only: an unpublished event is still owed to JetStream, whatever its age.
# Delivery events (no actor) and audit events have their own retention (and partial index).
DELETE_PUBLISHED_EVENTS = batched_delete(
    "events", "id", "published_at", where="published_at IS NOT NULL AND actor IS NULL"
)
DELETE_PUBLISHED_AUDIT_EVENTS = batched_delete(
    "events", "id", "published_at", where="published_at IS NOT NULL AND actor IS NOT NULL"
)

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    interval_s: float
    batch_size: int
    # None: keep published events forever.
    events_max_age: timedelta | None
    # The same for audit-class events (the environment's default: 400 days).
    audit_max_age: timedelta | None = None


def retention_days(name: str, default: int, *, minimum: int = 1) -> timedelta | None:
    """A `<...>_RETENTION_DAYS` variable: whole days, at least `minimum`, or 0 meaning "keep
    forever" (None)."""
    days = env_int(name, default, minimum=0, maximum=MAX_RETENTION_DAYS)
    if 0 < days < minimum:
        raise ConfigError(f"{name} must be 0 (keep forever) or at least {minimum}, got {days}")
    return timedelta(days=days) if days else None


def load_retention_settings() -> RetentionSettings:
    return RetentionSettings(
        interval_s=env_float(
            "RETENTION_INTERVAL_SECONDS", DEFAULT_INTERVAL_S, minimum=1.0, maximum=7 * 86400.0
        ),
        batch_size=env_int("RETENTION_BATCH_SIZE", DEFAULT_BATCH_SIZE, minimum=1, maximum=100_000),
        events_max_age=retention_days("EVENTS_RETENTION_DAYS", DEFAULT_EVENTS_RETENTION_DAYS),
        audit_max_age=retention_days("AUDIT_RETENTION_DAYS", DEFAULT_AUDIT_RETENTION_DAYS),
    )


@dataclass(frozen=True, slots=True)
class Purge:
    """One table's purge: `sql` deletes at most `$2` rows older than the interval `$1`."""

    table: str
    sql: str
    max_age: timedelta


def published_events_purge(settings: RetentionSettings) -> list[Purge]:
    """The events purges every service runs (none of a class kept forever)."""
    purges = []
    if settings.events_max_age is not None:
        purges.append(Purge("events", DELETE_PUBLISHED_EVENTS, settings.events_max_age))
    if settings.audit_max_age is not None:
        purges.append(Purge("audit events", DELETE_PUBLISHED_AUDIT_EVENTS, settings.audit_max_age))
    return purges


def _deleted_count(status: str) -> int:
    # asyncpg returns the command tag, "DELETE <n>".
    verb, _, count = status.rpartition(" ")
    if verb != "DELETE" or not count.isdigit():
        raise ValueError(f"retention statement must be a DELETE, got {status!r}")
    return int(count)


async def delete_in_batches(
    pool: asyncpg.Pool,
    sql: str,
    params: Sequence[object],
    batch_size: int,
    *,
    pause_s: float = DEFAULT_PAUSE_S,
    stop: asyncio.Event | None = None,
) -> int:
    """Run `sql` with `params` and `batch_size` (its last parameter) until it deletes fewer
    than `batch_size` rows or `stop` is set; returns how many rows were deleted."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    never = asyncio.Event()
    total = 0
    while True:
        deleted = _deleted_count(await pool.execute(sql, *params, batch_size))
        total += deleted
        if deleted < batch_size or (stop is not None and stop.is_set()):
            return total
        await wait_any(stop or never, timeout_s=pause_s)


class RetentionTask:
    """Runs a service's purges now and then every interval, in every replica."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        purges: Sequence[Purge],
        *,
        interval_s: float,
        batch_size: int,
        pause_s: float = DEFAULT_PAUSE_S,
    ) -> None:
        self._pool = pool
        self._purges = tuple(purges)
        self._interval_s = interval_s
        self._batch_size = batch_size
        self._pause_s = pause_s

    @classmethod
    def from_settings(
        cls, pool: asyncpg.Pool, settings: RetentionSettings, purges: Sequence[Purge] = ()
    ) -> RetentionTask:
        """The events purge plus the service's own `purges`."""
        return cls(
            pool,
            [*published_events_purge(settings), *purges],
            interval_s=settings.interval_s,
            batch_size=settings.batch_size,
        )

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(purge.table for purge in self._purges)

    async def run_once(self, stop: asyncio.Event | None = None) -> dict[str, int]:
        """Purge every table once; returns the rows deleted per table."""
        deleted: dict[str, int] = {}
        for purge in self._purges:
            if stop is not None and stop.is_set():
                break
            deleted[purge.table] = await delete_in_batches(
                self._pool,
                purge.sql,
                (purge.max_age,),
                self._batch_size,
                pause_s=self._pause_s,
                stop=stop,
            )
        return deleted

    async def run(self, stop: asyncio.Event) -> None:
        """Purge until `stop` is set. A failed round (database down) is logged and retried at
        the next interval, never fatal."""
        while not stop.is_set():
            try:
                deleted = await self.run_once(stop)
            except Exception as error:
                _log.warning("retention.failed", extra={"fields": {"error": str(error)}})
            else:
                if any(deleted.values()):
                    _log.info("retention.purged", extra={"fields": {"deleted": deleted}})
            await wait_any(stop, timeout_s=self._interval_s)
