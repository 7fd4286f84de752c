"""Maximum-throughput load with `wrk`, fed pre-built signed requests through a Lua script.

`wrk` (Debian package `wrk`) is a closed-loop generator written in C: each connection sends its
next request as soon as the previous answer arrives, so it finds the server's maximum rate while
costing far less CPU than any Python client. Its latencies at that rate are "latency under
saturation" (queueing included); steady-rate latency comes from `tools.bench.open_loop`.

The Lua script is written to a temporary directory at run time. Its `init` loads a file of
`<signature>\\t<form body>` lines (one per distinct webhook) into a table of ready-made HTTP
requests; `request()` cycles through that table; `done()` prints one `WRKJSON {...}` line with
the counts and the latency percentiles (µs) that `run_wrk` parses. wrk counts every answer with
a status above 399 in `errors.status`; the servers measured here answer only 200 or 4xx/5xx, so
`requests - errors.status` is the number of 200 answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tools.bench.webhooks import SignedWebhook

_MARK = "WRKJSON "

_LUA = r"""
local requests = {}
local next_index = 0

function init(args)
  local headers_for = function(signature)
    return {
      ["Content-Type"] = "application/x-www-form-urlencoded",
      ["X-Twilio-Signature"] = signature,
    }
  end
  for line in io.lines(args[1]) do
    local signature, body = line:match("^([^\t]*)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", wrk.path, headers_for(signature), body)
  end
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function done(summary, latency, _requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    "WRKJSON ", summary.requests, summary.duration, summary.bytes, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


class WrkMissingError(RuntimeError):
    """wrk is not installed and could not be installed; the message says what to do."""


@dataclass(frozen=True)
class WrkResult:
    requests: int  # answers received
    duration_s: float
    status_errors: int  # answers with a status above 399
    socket_errors: int  # connect + read + write errors and timeouts
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def ok_answers(self) -> int:
        return self.requests - self.status_errors

    @property
    def ok_rps(self) -> float:
        return self.ok_answers / self.duration_s


def ensure_wrk() -> str:
    """The path of `wrk`; as root, install Debian's package when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise WrkMissingError("wrk not found: install it (Debian/Ubuntu: sudo apt-get install wrk)")
    print("wrk not found; installing the Debian package wrk", file=sys.stderr, flush=True)
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def quiet(command: list[str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )

    if quiet(install).returncode != 0:
        # A fresh image often has no package lists yet.
        quiet(["apt-get", "update", "-q"])
        done = quiet(install)
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise WrkMissingError(f"could not install wrk with apt-get: {' '.join(tail)}")
    found = shutil.which("wrk")
    if not found:
        raise WrkMissingError("apt-get installed wrk but it is not on PATH")
    return found


def write_wrk_inputs(
    workdir: Path, webhooks: Iterable[SignedWebhook], name: str = "webhooks"
) -> tuple[Path, Path]:
    """Write the Lua script and the request table it loads (`<name>.tsv`, replaced if there);
    return (script, requests file)."""
    script = workdir / "webhooks.lua"
    script.write_text(_LUA)
    table = workdir / f"{name}.tsv"
    with table.open("w") as out:
        for webhook in webhooks:
            out.write(f"{webhook.signature}\t{webhook.body}\n")
    return script, table


def run_wrk(
    url: str,
    script: Path,
    table: Path,
    *,
    seconds: float,
    connections: int = 32,
    threads: int = 1,
    timeout_s: float = 5.0,
) -> WrkResult:
    """One closed-loop wrk run against `url`; raises RuntimeError when wrk fails."""
    cmd = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    cmd += [f"--timeout={max(1, round(timeout_s))}s", "--latency", "-s", str(script)]
    cmd += [url, "--", str(table)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if done.returncode != 0 or not lines:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"wrk failed (exit {done.returncode}): {' '.join(detail)}")
    raw = json.loads(lines[-1][len(_MARK) :])
    socket_errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors"))
    return WrkResult(
        requests=raw["requests"],
        duration_s=raw["duration_us"] / 1e6,
        status_errors=raw["status_errors"],
        socket_errors=socket_errors + raw["timeouts"],
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )
