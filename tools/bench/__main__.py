"""`make bench`: run every benchmark several times and write `docs/BENCHMARKS.md`.

    python -m tools.bench [--runs 3] [--only gateway,routing] [--bench-args 'gateway=--seconds 5']

Runs each module of `BENCHES` that exists (a missing one is listed under "Not run"), `--runs`
times, interleaved (run 1 of every bench, then run 2, ...) so a noisy minute does not land on
one bench only. Each run is a fresh `python -m tools.bench.<name>_bench` process with
`SNAPSELL_BENCH_RUN=<k>` (1-based) in its environment. Its output is echoed, the figures are
collected, and the report (machine facts, one table per bench with the median and every run's
value, the targets, the commands to reproduce) is written even when some runs failed; the exit
code is then 1. The runner adds two figures to every run, so a run disturbed by other work on
the machine shows: `machine_load_1m`, the load average just before it, and
`machine_other_cpu_cores`, the CPU the rest of the machine used meanwhile (all CPU time from
/proc/stat minus the bench's own process tree's), in cores on average.

Contract for a bench module `tools/bench/<name>_bench.py`:
- `python -m tools.bench.<name>_bench` works without arguments, starts everything it needs
  (embedded NATS/PostgreSQL in a temp dir unless told otherwise) and stops it by PID;
- progress goes to stderr (stdout is fine too); the LAST line of stdout is one JSON object:

      {"bench": "<name>",
       "figures": {"<figure>": <number>, ...},        # flat; unit in the name: _rps _ms _mb _pct
       "targets": {"<figure>": ">= 0.5", ...},        # optional: shown with met / MISSED
       "params":  {"<name>": <value>, ...},           # optional: how it was run, shown as text
       "notes":   ["<anything worth reading>", ...]}  # optional

  booleans as 0/1. A ratio against a peer is a figure the bench computes within its run
  (`ratio` = ours / peer's), so the report's median is a median of per-run ratios;
- exit code 0 when it measured, non-zero when it could not (its last stderr line is reported).
A last JSON object without "figures" is still accepted: its numeric leaves become figures,
named by their dotted path (`latency.p99_ms`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO, Any

from tools.bench.report import ROOT, BenchRuns, CpuAccount, machine_facts, render

BENCHES = ("gateway", "seller_admin", "live_session", "routing", "outbox", "e2e", "claims")
DEFAULT_OUTPUT = ROOT / "docs" / "BENCHMARKS.md"
INTERRUPT_GRACE_S = 60.0


def module_of(name: str) -> str:
    return f"tools.bench.{name}_bench"


def last_json_object(stdout: str) -> dict[str, Any] | None:
    """The last JSON object printed: a one-line object, or else a pretty-printed one."""
    lines = stdout.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if not lines[index].startswith("{"):
            continue
        for text in (lines[index], "\n".join(lines[index:])):
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _flatten(value: Any, prefix: str = "") -> dict[str, float]:
    if isinstance(value, bool):
        return {prefix: int(value)} if prefix else {}
    if isinstance(value, int | float):
        return {prefix: value} if prefix else {}
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            if key != "bench":
                out |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {}


def normalise(result: dict[str, Any]) -> dict[str, Any]:
    if isinstance(result.get("figures"), dict):
        result["figures"] = _flatten(result["figures"])
        return result
    return {"bench": result.get("bench"), "figures": _flatten(result)}


def run_once(name: str, run: int, runs: int, extra: list[str], timeout_s: float) -> dict[str, Any]:
    """One bench process; returns its normalised JSON or raises RuntimeError saying why not."""
    label = f"[{name} {run}/{runs}]"
    cmd = [sys.executable, "-m", module_of(name), *extra]
    print(f"{label} {shlex.join(cmd)}", file=sys.stderr, flush=True)
    env = {**os.environ, "SNAPSELL_BENCH_RUN": str(run)}
    # Same process group as ours: a Ctrl-C reaches the bench, whose cleanup then runs.
    pipe = subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=pipe, stderr=pipe, text=True, bufsize=1)
    timed_out = threading.Event()
    timer = threading.Timer(timeout_s, _interrupt, args=(proc, timed_out))
    timer.start()
    collected: deque[str] = deque(maxlen=2000)
    errors: deque[str] = deque(maxlen=2)
    assert proc.stdout is not None and proc.stderr is not None
    echo_errors = threading.Thread(target=_echo, args=(proc.stderr, label, errors), daemon=True)
    echo_errors.start()
    try:
        _echo(proc.stdout, label, collected)
        code = proc.wait()
        echo_errors.join()
    finally:
        timer.cancel()
    if code != 0:
        why = f"timed out after {timeout_s:.0f}s" if timed_out.is_set() else f"exit code {code}"
        raise RuntimeError(f"{why}: {' / '.join(errors) or 'no message'}")
    result = last_json_object("\n".join(collected))
    if result is None:
        raise RuntimeError("printed no JSON object")
    return normalise(result)


def _echo(stream: IO[str], label: str, keep: deque[str]) -> None:
    """Show a bench's output line by line as it comes, keeping the last non-empty lines."""
    for line in stream:
        print(f"{label} {line}", end="", file=sys.stderr, flush=True)
        if line.strip():
            keep.append(line.strip())


def _interrupt(proc: subprocess.Popen[str], timed_out: threading.Event) -> None:
    """Timeout: SIGINT lets the bench stop what it started; SIGKILL if it does not exit."""
    if proc.poll() is None:
        timed_out.set()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()


def _python_shown() -> str:
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(ROOT))
    except ValueError:
        return "python"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--runs", type=int, default=3, help="runs per benchmark (default 3)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {BENCHES}")
    parser.add_argument(
        "--bench-args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="extra arguments for one bench, e.g. 'gateway=--seconds 5' (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per bench run")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in wanted if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {unknown}; known: {', '.join(BENCHES)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.wanted = wanted
    args.extra = {}
    for item in args.bench_args:
        name, _, extra = item.partition("=")
        if name not in BENCHES:
            parser.error(f"--bench-args: unknown bench {name!r}")
        args.extra[name] = shlex.split(extra)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    facts = machine_facts()
    present = [n for n in args.wanted if importlib.util.find_spec(module_of(n)) is not None]
    skipped = [
        f"`{n}`: `tools/bench/{n}_bench.py` does not exist yet"
        for n in args.wanted
        if n not in present
    ]
    for note in skipped:
        print(f"skipping {note}", file=sys.stderr)
    benches = {name: BenchRuns(name) for name in present}
    for run in range(1, args.runs + 1):
        for name, bench in benches.items():
            load_1m, before = os.getloadavg()[0], CpuAccount.now()
            try:
                result = run_once(name, run, args.runs, args.extra.get(name, []), args.timeout)
            except RuntimeError as exc:
                bench.results.append(None)
                bench.failures.append(f"run {run}: {exc}")
                print(f"[{name} {run}/{args.runs}] FAILED: {exc}", file=sys.stderr)
                continue
            # Other work on the machine skews every figure: say how much there was.
            result["figures"]["machine_load_1m"] = round(load_1m, 2)
            result["figures"]["machine_other_cpu_cores"] = round(before.others_since(), 2)
            bench.results.append(result)
    python = _python_shown()
    this = shlex.join([python, "-m", "tools.bench", *argv])
    commands = [f"make bench   # = {python} -m tools.bench (every bench, 3 runs)"]
    if argv:
        commands.append(f"{this}   # this report")
    for name in present:
        commands.append(shlex.join([python, "-m", module_of(name), *args.extra.get(name, [])]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(facts, list(benches.values()), skipped, commands, args.runs))
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if any(b.failures for b in benches.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
