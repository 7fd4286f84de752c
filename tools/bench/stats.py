"""The benchmarks' statistics: percentiles, medians of rounds, and what a process used (CPU
time, peak memory) read from /proc (Linux only)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tools.stack import process_tree

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_TREE_REFRESH_S = 1.0


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (the smallest value with at least `pct`% of the values at or
    below it); NaN when there are none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over rounds, rounded to 2 decimals."""
    return {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}


def _stat_fields(pid: int | str) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of `root` and every descendant alive now, with what each of them
    has reaped of its exited children (a PostgreSQL backend that ended is in the postmaster's
    figure, a live one is a descendant): the difference of two readings is the tree's CPU
    between them."""
    ticks = 0
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / _TICKS_PER_S


def status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (`VmRSS`, `VmHWM`), 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss_mb(pid: int) -> float:
    """The kernel's high-water mark of a live process's resident memory (VmHWM), in MiB."""
    return round(status_kib(pid, "VmHWM") / 1024, 1)


class PeakRss:
    """Peak resident memory of a process and its descendants (a service may fork workers, so
    the figure is the whole tree's): a daemon thread sums `VmRSS` over the tree every
    `interval_s` between `start()` and `stop()` and keeps the largest sum. The tree itself is
    re-read once a second only (a scan of /proc costs a few ms). For a single process, the
    kernel's own high-water mark `VmHWM` catches peaks between two samples and is used when it
    is larger."""

    def __init__(self, root_pid: int, interval_s: float = 0.1) -> None:
        self._root = root_pid
        self._interval = interval_s
        self._peak_kib = 0
        self._single_process = True
        self._tree: list[int] = []
        self._tree_read_at = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stop sampling (call before the process exits); return the peak in MiB."""
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peak_mb

    @property
    def peak_mb(self) -> float:
        return self._peak_kib / 1024

    def _sample(self) -> None:
        if not os.path.exists(f"/proc/{self._root}"):
            return
        if time.monotonic() - self._tree_read_at >= _TREE_REFRESH_S:
            self._tree, self._tree_read_at = process_tree(self._root), time.monotonic()
        tree = self._tree
        self._single_process = self._single_process and len(tree) == 1
        total = sum(status_kib(pid, "VmRSS") for pid in tree)
        if self._single_process:
            total = max(total, status_kib(self._root, "VmHWM"))
        self._peak_kib = max(self._peak_kib, total)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()
