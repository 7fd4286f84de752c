"""What the benchmarks share: the stack a benchmark drives (`bench_stack`: its services on
`tools.stack`, PostgreSQL and NATS embedded in a temporary directory unless DATABASE_URL / NATS_URL
are set), shops set up through seller_admin's API, rounds of closed-loop callers (throughput, CPU
per call) and of an open-loop load at a fixed rate (latency), and a
bare `grpc.aio` unary echo with the same server settings as the services (run as
`python -m tools.bench.harness`, on `GRPC_PORT`), the peer the gRPC benchmarks compare with."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import uvloop
from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra.grpc_server import GrpcServer
from tools.bench.report import target_met
from tools.bench.stats import cpu_seconds, median_of, percentile
from tools.dev_keys import DevKeys
from tools.devstack import DevstackError
from tools.stack import (
    SERVICES,
    Infrastructure,
    SystemStack,
    infrastructure,
    spawn_service,
    start_system,
)

ECHO_SERVICE = "bench.v1.EchoService"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
Call = Callable[[int], Awaitable[object]]


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve_echo(port: int) -> None:
    server = GrpcServer(port, [ECHO_SERVICE], host="127.0.0.1")
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(_echo)
    server.server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": handler}),)
    )
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1.0)


# As the round benchmarks have always run them, for figures comparable with earlier reports:
# every service connects to NATS as the admin user, not as its own.
ADMIN_NATS_ENV = {"LOG_LEVEL": "WARNING", "NATS_USER": "", "NATS_PASSWORD": ""}


@contextlib.asynccontextmanager
async def bench_stack(
    services: Sequence[str] = SERVICES,
    prefix: str = "bench-",
    *,
    work_dir: Path | None = None,
    env: Mapping[str, str] = ADMIN_NATS_ENV,
    service_env: Mapping[str, Mapping[str, str]] | None = None,
    echo: bool = False,
) -> AsyncIterator[tuple[SystemStack, Infrastructure]]:
    """PostgreSQL and NATS (embedded in `work_dir`, by default a temporary directory, unless
    DATABASE_URL / NATS_URL are set), the sandbox, `services` (`env` added to each one's
    environment) and, with `echo`, the echo server as `echo`; all stopped by PID on the way out.
    Yields the stack and its PostgreSQL and NATS."""
    with contextlib.ExitStack() as exits:
        tmp = work_dir or Path(exits.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        found = exits.enter_context(infrastructure(tmp))
        stack = await start_system(
            found.dsn,
            found.nats_url,
            DevKeys(tmp / "keys"),
            tmp,
            services=services,
            env=env,
            service_env=service_env,
            trace=False,
        )
        try:
            if echo:
                stack.services["echo"] = spawn_service(
                    "echo", {}, module="tools.bench.harness", log_dir=tmp / "logs"
                )
                await stack.services["echo"].wait_ready()
            yield stack, found
        finally:
            await stack.stop()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def create_shop(
    stack: SystemStack, tenant_id: str, channel: str, sellers: Sequence[str] = ()
) -> None:
    """A tenant with one channel (a `whatsapp:+...` number or a Messaging Service SID) of the
    stack's Twilio account and its seller phones, created through seller_admin's API."""
    admin = bearer(stack.keys.token("admin", sub="bench", audience="seller_admin"))
    async with grpc.aio.insecure_channel(stack.address("seller_admin")) as channel_to:
        stub = seller_admin_pb2_grpc.SellerAdminServiceStub(channel_to)
        await stub.CreateTenant(
            pb.CreateTenantRequest(tenant_id=tenant_id, display_name=tenant_id),
            metadata=admin,
            timeout=10,
        )
        await stub.AddChannel(
            pb.AddChannelRequest(
                tenant_id=tenant_id, address=channel, account_sid=stack.account_sid
            ),
            metadata=admin,
            timeout=10,
        )
        for seller in sellers:
            await stub.AddSellerPhone(
                pb.AddSellerPhoneRequest(tenant_id=tenant_id, phone_number=seller),
                metadata=admin,
                timeout=10,
            )


async def drive(call: Call, callers: int, seconds: float, server_pid: int) -> dict[str, float]:
    """`callers` loops calling back to back for `seconds` (caller i's n-th call gets the index
    i + n * callers): calls/s and the server process's CPU time per call (a figure other load
    on the machine barely moves). No latency: a closed loop's is callers / rate (`open_loop`)."""
    done = errors = 0
    deadline = time.perf_counter() + seconds

    async def caller(index: int) -> None:
        nonlocal done, errors
        calls = 0
        while time.perf_counter() < deadline:
            try:
                await call(index + calls * callers)
                done += 1
            except grpc.aio.AioRpcError:
                errors += 1
            calls += 1

    began, cpu_began = time.perf_counter(), cpu_seconds(server_pid)
    await asyncio.gather(*(caller(i) for i in range(callers)))
    elapsed, cpu = time.perf_counter() - began, cpu_seconds(server_pid) - cpu_began
    return {
        "rps": done / elapsed,
        "server_cpu_us_per_call": 1e6 * cpu / max(1, done),
        "errors": errors,
    }


async def at_rate(
    call: Callable[[int, float], Coroutine[Any, Any, object]],
    rate: float,
    count: int,
    delay: float = 0.0,
) -> None:
    """`call(i, scheduled)` for i < `count`, each as its own task started at its scheduled time
    (the loop's clock: `delay` from now, then every 1/`rate` s) whatever the earlier ones are
    doing, so a slow call delays none of the next; returns once all have finished."""
    loop = asyncio.get_running_loop()
    start, calls = loop.time() + delay, []
    for index in range(count):
        scheduled = start + index / rate
        await asyncio.sleep(max(0.0, scheduled - loop.time()))
        calls.append(asyncio.create_task(call(index, scheduled)))
    await asyncio.gather(*calls)


async def open_loop(call: Call, rate: float, seconds: float) -> dict[str, float]:
    """Calls started at `rate` per second for `seconds` (`at_rate`), latency counted from each
    one's scheduled time: a stall shows in the percentiles (closed-loop callers would just call
    less, and their p50 is callers / rate)."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0

    async def one(index: int, scheduled: float) -> None:
        nonlocal errors
        try:
            await call(index)
        except grpc.aio.AioRpcError:
            errors += 1
            return
        latencies.append(loop.time() - scheduled)

    await at_rate(one, rate, round(rate * seconds), delay=0.01)
    return {
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "open_loop_errors": errors,
    }


async def measure_rounds(
    kinds: dict[str, tuple[Call, int]], callers: int, rounds: int, seconds: float, rate: float
) -> dict[str, list[dict[str, float]]]:
    """Each kind of call (its call and its server's PID) driven for a 1 s warm-up
    (connections, prepared statements, caches), then `rounds` rounds of, per kind in turn,
    `seconds` of closed-loop callers (`rps`, CPU per call) and `seconds` of an open loop at
    `rate` (`p50_ms`, `p99_ms`); each kind's rounds."""
    for call, pid in kinds.values():
        await drive(call, callers, 1.0, pid)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in kinds}
    for number in range(rounds):
        for name, (call, pid) in kinds.items():
            closed = await drive(call, callers, seconds, pid)
            results[name].append(closed | await open_loop(call, rate, seconds))
        shown = (
            f"{name} {r[-1]['rps']:.0f}/s p99 {r[-1]['p99_ms']:.1f} ms"
            for name, r in results.items()
        )
        print(f"round {number + 1}: " + ", ".join(shown), file=sys.stderr)
    return results


def kinds_figures(rounds: Mapping[str, list[dict[str, float]]]) -> dict[str, float]:
    """Each kind's figures, the medians over its rounds, named `<kind>_<figure>`."""
    return {f"{kind}_{k}": v for kind, r in rounds.items() for k, v in median_of(r).items()}


@contextlib.asynccontextmanager
async def echo_caller(stack: SystemStack, payload: bytes) -> AsyncIterator[tuple[Call, int]]:
    """A call of the echo server with `payload`, on its own channel, and the server's PID."""
    async with grpc.aio.insecure_channel(stack.address("echo")) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO_METHOD)

        async def call(index: int) -> object:
            return await echo(payload)

        yield call, stack.services["echo"].pid


def rounds_parser(doc: str, callers: int) -> argparse.ArgumentParser:
    """The options of a benchmark measured in rounds against the echo."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=callers)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--rate", type=float, default=750.0, help="open-loop calls/s for latency (e2e target)"
    )
    return parser


def run_in_workdir(name: str, keep: bool, measure: Callable[[Path], dict[str, Any]]) -> int:
    """`measure` a bench in a fresh temp dir (kept with `keep`) and print its JSON; exit code 1
    with one line on stderr when it failed, 130 when interrupted."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-bench-"))
    try:
        result = measure(workdir)
    except (RuntimeError, DevstackError, OSError) as exc:
        print(f"{name} bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Everything started was stopped on the way out; the runner sends SIGINT on timeout.
        print(f"{name} bench interrupted", file=sys.stderr)
        return 130
    finally:
        if keep:
            print(f"{name} bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0


def run_whole_system(
    name: str,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, Path], Coroutine[Any, Any, dict[str, Any]]],
) -> int:
    """`run_in_workdir` for a bench measured by a coroutine, run on uvloop."""

    def measure(workdir: Path) -> dict[str, Any]:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(run(args, workdir))

    return run_in_workdir(name, args.keep, measure)


def say_missed(
    say: Callable[[str], None], figures: dict[str, float], targets: dict[str, str]
) -> None:
    """A line `MISSED <figure> = <value> (target ...)` for each target not met (or not measured)."""
    for name, target in targets.items():
        value = figures.get(name)
        if value is None or not target_met(value, target):
            say(f"MISSED {name} = {value} (target {target})")


def print_report(measure: Coroutine[None, None, dict[str, object]]) -> int:
    """Run `measure` on uvloop (as the services run) and print its report as the last line."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(measure)), flush=True)
    return 0


if __name__ == "__main__":
    uvloop.run(serve_echo(int(os.environ["GRPC_PORT"])))
