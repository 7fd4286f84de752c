"""`docs/BENCHMARKS.md`: the machine, one table of figures per benchmark, how to reproduce.

Rendering only: the runner (`tools.bench.__main__`) collects the runs and hands them over. A
figure's median is taken over the runs that produced it; a ratio is a figure each bench computes
within its run, so its median is the median of per-run ratios, never a ratio of medians.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_TARGET = re.compile(r"^\s*(>=|<=|>|<|==)\s*(-?[0-9.]+)")
_COMPARE = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__}
_COMPARE["=="] = float.__eq__


@dataclass
class BenchRuns:
    name: str
    results: list[dict[str, Any] | None] = field(default_factory=list)  # None = failed run
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CpuAccount:
    """Busy CPU time of the whole machine and of our reaped children, at one moment.

    Every process a bench starts is its child (servers included) and is waited for, so its CPU
    time ends up in our RUSAGE_CHILDREN once the bench exits; the rest is other work.
    """

    at: float
    machine_busy_s: float
    children_s: float

    @classmethod
    def now(cls) -> CpuAccount:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        ticks = user + nice + system + irq + softirq + steal
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_s = ticks / os.sysconf("SC_CLK_TCK")
        return cls(time.monotonic(), busy_s, usage.ru_utime + usage.ru_stime)

    def others_since(self) -> float:
        """Average cores used by processes other than our children since this moment."""
        later = CpuAccount.now()
        others = (later.machine_busy_s - self.machine_busy_s) - (later.children_s - self.children_s)
        return max(0.0, others / max(later.at - self.at, 1e-9))


def machine_facts() -> dict[str, str]:
    """Call at the start of a run: the load average then says how busy the machine was."""
    cpu = "unknown"
    ram = "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        ram = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": cpu,
        "Cores": f"{os.cpu_count()} ({usable} usable by the benchmarks)",
        "RAM": ram,
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "Load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "Commit": _commit(),
        "Date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def _number(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def target_met(value: float, target: str) -> bool | None:
    """Whether `value` meets a target such as `>= 0.5` or `== 1`; None for a target in words."""
    match = _TARGET.match(target)
    if not match:
        return None
    return _COMPARE[match.group(1)](float(value), float(match.group(2)))


def _verdict(median: float, target: str) -> str:
    met = target_met(median, target)
    return target if met is None else f"{target} — {'met' if met else 'MISSED'}"


def _bench_section(bench: BenchRuns) -> list[str]:
    ok = [r for r in bench.results if r is not None]
    lines = [f"## {bench.name}", ""]
    runs = len(bench.results)
    lines.append(f"{len(ok)} of {runs} runs succeeded.")
    lines += [f"- run failed: {failure}" for failure in bench.failures]
    if not ok:
        return [*lines, ""]
    params = ok[-1].get("params") or {}
    if params:
        lines += ["", "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in params.items())]
    targets: dict[str, str] = {}
    names: list[str] = []
    for result in ok:
        targets |= result.get("targets") or {}
        names += [n for n in result["figures"] if n not in names]
    header = ["figure", "median", *(f"run {i + 1}" for i in range(runs)), "target"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        per_run = [
            None if r is None else r["figures"].get(name) for r in bench.results
        ]  # keep the run columns aligned with failed runs
        values = [float(v) for v in per_run if isinstance(v, int | float)]
        median = statistics.median(values) if values else float("nan")
        cells = ["—" if v is None else _number(float(v)) for v in per_run]
        target = _verdict(median, targets[name]) if name in targets and values else ""
        lines.append(f"| `{name}` | **{_number(median)}** | {' | '.join(cells)} | {target} |")
    notes = [(i + 1, n) for i, r in enumerate(bench.results) if r for n in r.get("notes") or []]
    if notes:
        lines += ["", "Notes:"] + [f"- run {i}: {note}" for i, note in notes]
    return [*lines, ""]


def render(
    facts: dict[str, str],
    benches: list[BenchRuns],
    skipped: list[str],
    commands: list[str],
    runs: int,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m tools.bench`); every number below comes from the run",
        "described here. Do not edit by hand: rerun it. Each benchmark module runs as its own",
        f"process, {runs} time(s), the runs of different benchmarks interleaved; the **median**",
        "is over the successful runs, and each run's value is shown. Ratios against peers are",
        "computed within each run (same machine, same minute), then their median is taken.",
        "Absolute figures drift between runs and machines; compare within one report.",
        "`machine_other_cpu_cores` is the CPU (in cores) that other work on the machine used",
        "during that run: a run where it is high was disturbed.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in facts.items()),
        "",
    ]
    for bench in benches:
        lines += _bench_section(bench)
    if skipped:
        lines += ["## Not run", "", *(f"- {note}" for note in skipped), ""]
    lines += ["## Reproduce", "", "```sh", *commands, "```", ""]
    return "\n".join(lines)
