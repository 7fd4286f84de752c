"""Peak resident memory, and CPU time, of a process and its descendants, read from /proc
(Linux only).

A service may run as one process or fork workers, so the figure is the whole tree's: a
background thread sums `VmRSS` over the tree every `interval_s`, and keeps the largest sum. The
tree itself is re-read once a second only (a scan of /proc costs a few ms). For
a single process, the kernel's own high-water mark `VmHWM` catches peaks between two samples
and is used when it is larger.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_PROC = Path("/proc")
_TREE_REFRESH_S = 1.0


def _status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status, 0 when the process is gone."""
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _parent_of(pid_dir: Path) -> int | None:
    try:
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; the ppid follows the last ")".
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def process_tree(root: int) -> list[int]:
    """`root` and every descendant alive now."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            parent = _parent_of(entry)
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of `root` and every descendant alive now, with what each of them
    has reaped of its exited children (a PostgreSQL backend that ended is in the postmaster's
    figure): the difference of two readings is the tree's CPU between them."""
    ticks = 0
    for pid in process_tree(root):
        try:
            stat = (_PROC / str(pid) / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime, stime, cutime, cstime: fields 14-17 of proc(5), 12-15 after the name.
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / _CLOCK_TICKS


class PeakRss:
    """Samples a PID tree's RSS in a daemon thread between `start()` and `stop()`."""

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
        total = sum(_status_kib(pid, "VmRSS") for pid in tree)
        if self._single_process:
            total = max(total, _status_kib(self._root, "VmHWM"))
        self._peak_kib = max(self._peak_kib, total)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()
