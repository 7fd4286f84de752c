"""Open-loop load at a steady rate, for honest latency figures (asyncio + raw sockets).

Why not wrk or hey: wrk cannot hold a rate, and `hey -q` paces each worker only after its
previous answer (a closed loop: when the server stalls, the client stops sending, and the stall
never shows in the percentiles — "coordinated omission"); hey also sends one fixed body, while
every webhook here must carry its own MessageSid and signature.

How: request i is *scheduled* at `start + i / rate`. A dispatcher wakes every millisecond (the
loop's timer resolution), releases every request whose time has come, and sends it on an idle
keep-alive connection (HTTP/1.1, one request in flight per connection, as Twilio's webhook client
does); a connection that receives its answer immediately takes the next released request.
Latency = answer fully received - release, so time spent waiting for a free connection (the
server being slow) counts, while the client's own tick (up to 1 ms late) does not;
`release_lag_p99_ms` (release - schedule) shows whether the client itself kept up. The client
does nothing per request but write prepared bytes and find `Content-Length` in the answer, so
its CPU stays small; `client_cpu_s` reports it (on the 2-core CI kind of machine: ~8% of a core
for the ticks plus ~0.05 ms per request, with uvloop).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from tools.bench.stats import percentile

_HEADER_END = b"\r\n\r\n"
_MIN_SLEEP_S = 0.001


@dataclass
class OpenLoopResult:
    rate: float  # requested
    sent: int
    statuses: dict[str, int]  # MessageSid -> HTTP status; absent when no answer came
    latencies_ms: list[float]  # sorted, one per answer
    release_lag_p99_ms: float  # how late the client released requests (its own delay)
    send_span_s: float  # first to last actual send
    client_cpu_s: float
    failures: list[str] = field(default_factory=list)
    # `time.monotonic()` at which request i was released (0.0 if the run ended before it was).
    released_at: list[float] = field(default_factory=list)

    def percentile(self, pct: float) -> float:
        """Nearest-rank percentile of the latencies (ms)."""
        return percentile(self.latencies_ms, pct)

    @property
    def achieved_rate(self) -> float:
        return (self.sent - 1) / self.send_span_s if self.send_span_s > 0 else 0.0


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection reading fixed-length answers."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._buffer = bytearray()
        self._needed: int | None = None  # total bytes of the current answer, once known
        self.transport: asyncio.Transport | None = None
        self.current: int | None = None  # index of the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._answer_complete():
            assert self._needed is not None
            status = int(self._buffer[9:12])
            del self._buffer[: self._needed]
            self._needed = None
            index, self.current = self.current, None
            if index is not None:
                self._run.answered(self, index, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._run.lost(self, exc)

    def _answer_complete(self) -> bool:
        if self._needed is None:
            end = self._buffer.find(_HEADER_END)
            if end < 0:
                return False
            head = bytes(self._buffer[:end]).lower()
            marker = head.find(b"\r\ncontent-length:")
            if marker < 0:
                raise RuntimeError("answer without Content-Length")
            value_end = head.find(b"\r\n", marker + 2)
            length = int(head[marker + 17 : value_end if value_end >= 0 else len(head)])
            self._needed = end + len(_HEADER_END) + length
        return len(self._buffer) >= self._needed


class _Run:
    def __init__(self, sids: Sequence[str], requests: Sequence[bytes], rate: float) -> None:
        self.sids, self.requests, self.rate = sids, requests, rate
        self.idle: deque[_Connection] = deque()
        self.overdue: deque[int] = deque()
        self.start = 0.0
        self.sent = 0
        self.first_send = self.last_send = 0.0
        self.released = [0.0] * len(requests)
        self.statuses: dict[str, int] = {}
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.outstanding = len(requests)
        self.all_done = asyncio.Event()

    def scheduled_at(self, index: int) -> float:
        return self.start + index / self.rate

    def send_overdue(self) -> None:
        while self.overdue and self.idle:
            conn = self.idle.popleft()
            if conn.transport is None:
                continue
            index = self.overdue.popleft()
            conn.current = index
            conn.transport.write(self.requests[index])
            now = time.monotonic()
            self.first_send = self.first_send or now
            self.last_send = now
            self.sent += 1

    def answered(self, conn: _Connection, index: int, status: int) -> None:
        self.latencies.append((time.monotonic() - self.released[index]) * 1000)
        self.statuses[self.sids[index]] = status
        self.idle.append(conn)
        self._finish_one()
        self.send_overdue()

    def lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn.current is not None:
            self.failures.append(f"{self.sids[conn.current]}: connection lost ({exc})")
            conn.current = None
            self._finish_one()

    def _finish_one(self) -> None:
        self.outstanding -= 1
        if self.outstanding <= 0:
            self.all_done.set()


async def run_open_loop(
    host: str,
    port: int,
    sids: Sequence[str],
    requests: Sequence[bytes],
    *,
    rate: float,
    connections: int = 32,
    drain_timeout_s: float = 30.0,
) -> OpenLoopResult:
    """Send `requests[i]` (for MessageSid `sids[i]`) at `rate` per second; wait for every answer."""
    loop = asyncio.get_running_loop()
    run = _Run(sids, requests, rate)
    opened = [
        await loop.create_connection(lambda: _Connection(run), host, port)
        for _ in range(connections)
    ]
    run.idle.extend(protocol for _transport, protocol in opened)
    cpu_before = time.process_time()
    run.start = time.monotonic() + 0.01
    next_index = 0
    try:
        while next_index < len(requests):
            now = time.monotonic()
            while next_index < len(requests) and run.scheduled_at(next_index) <= now:
                run.released[next_index] = now
                run.overdue.append(next_index)
                next_index += 1
            run.send_overdue()
            if next_index < len(requests):
                # The loop's timers tick in whole milliseconds: a shorter sleep returns at once
                # and would spin. Sending up to 1 ms late is counted in the latencies anyway.
                delay = run.scheduled_at(next_index) - time.monotonic()
                await asyncio.sleep(max(_MIN_SLEEP_S, delay))
        try:
            await asyncio.wait_for(run.all_done.wait(), drain_timeout_s)
        except TimeoutError:
            run.failures.append(f"{run.outstanding} requests unanswered after {drain_timeout_s}s")
        if run.sent < len(requests):
            run.failures.append(f"only {run.sent} of {len(requests)} requests could be sent")
    finally:
        for transport, _protocol in opened:
            transport.close()
    lags = sorted(run.released[i] - run.scheduled_at(i) for i in range(len(requests)))
    return OpenLoopResult(
        rate=rate,
        sent=run.sent,
        statuses=run.statuses,
        latencies_ms=sorted(run.latencies),
        release_lag_p99_ms=percentile(lags, 99) * 1000 if lags else 0.0,
        send_span_s=run.last_send - run.first_send,
        client_cpu_s=time.process_time() - cpu_before,
        failures=run.failures,
        released_at=run.released,
    )
