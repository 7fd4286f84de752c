"""`GATEWAY_WORKERS=2`: two gateway processes behind one port, one set of metrics, one stop."""

from __future__ import annotations

import asyncio
import os
import signal
from urllib.parse import urlencode

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.config import CONFIGURATION_ERROR_EXIT
from tests.support.gateway import PUBLIC_BASE_URL, spawn_gateway, start_gateway
from tests.support.twilio import sign, whatsapp_params
from tools.bench.otlp_sink import PROTOCOLS, OtlpSink

MESSAGES = "/webhooks/twilio/messages"
HTTP = "http/protobuf"


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _mapped_packages(pid: int, packages: tuple[str, ...]) -> set[str]:
    """Which of `packages` have a compiled extension mapped in the process (every one below
    has one, loaded on import)."""
    with open(f"/proc/{pid}/maps") as maps:
        paths = maps.read()
    return {package for package in packages if f"/{package}/" in paths}


def _accepted(metrics_text: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if (
                sample.name == "snapsell_gateway_webhook_requests_total"
                and sample.labels.get("outcome") == "accepted"
            ):
                return sample.value
    return 0.0


async def _post_on_fresh_connection(base: str) -> int:
    """One webhook per TCP connection, so the kernel may hand each to either worker."""
    params = whatsapp_params()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": sign(PUBLIC_BASE_URL + MESSAGES, params),
    }
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        reply = await http.post(MESSAGES, content=urlencode(params), headers=headers)
    return reply.status_code


async def test_workers_share_the_port_and_answer_metrics_for_all(nats_url: str) -> None:
    gateway = await start_gateway(
        nats_url, GATEWAY_WORKERS="2", GATEWAY_SENDER_MESSAGES_PER_MINUTE="1000"
    )
    try:
        base = f"http://{gateway.address}"
        workers = _children(gateway.pid)
        assert len(workers) == 2
        # The supervisor never loads the app (~18 MB resident; ~60 MB when it did).
        assert _resident_mb(gateway.pid) < 35

        statuses = await asyncio.gather(*(_post_on_fresh_connection(base) for _ in range(40)))
        assert statuses == [200] * 40

        # Whichever worker answers /metrics counts every worker's webhooks.
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            for _ in range(4):
                assert _accepted((await http.get("/metrics")).text) == 40
    finally:
        assert gateway.stop() == 0, gateway.logs()
    assert not any(_alive(pid) for pid in workers)


async def test_a_dead_worker_is_started_again(nats_url: str) -> None:
    gateway = await start_gateway(
        nats_url, GATEWAY_WORKERS="2", GATEWAY_SENDER_MESSAGES_PER_MINUTE="1000"
    )
    try:
        first, second = _children(gateway.pid)
        os.kill(first, signal.SIGKILL)
        async with asyncio.timeout(30):
            while True:
                workers = _children(gateway.pid)
                if len(workers) == 2 and first not in workers:
                    break
                await asyncio.sleep(0.1)
        assert second in workers
        statuses = [await _post_on_fresh_connection(f"http://{gateway.address}") for _ in range(6)]
        assert statuses == [200] * 6
    finally:
        assert gateway.stop() == 0, gateway.logs()


async def test_a_configuration_error_of_the_workers_stops_the_gateway(nats_url: str) -> None:
    """A value only the workers read (the tracing protocol) is wrong: restarting them cannot
    help, so the supervisor stops them and exits as a single process would, with the one-line
    message in its output."""
    gateway = spawn_gateway(
        nats_url,
        GATEWAY_WORKERS="2",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/json",
    )
    try:
        async with asyncio.timeout(30):
            while gateway.process.poll() is None:
                await asyncio.sleep(0.1)
        workers_started = gateway.logs().count('"event":"gateway.worker_started"')
    finally:
        code = gateway.stop()
    assert code == CONFIGURATION_ERROR_EXIT, gateway.logs()
    assert workers_started == 2  # none started again
    assert (
        "gateway: configuration error: OTEL_EXPORTER_OTLP_PROTOCOL must be one of grpc, "
        "http/protobuf, got 'http/json'\n"
    ) in gateway.logs()


@pytest.mark.parametrize(("protocol", "loaded_by_tracing"), [("grpc", {"grpc"}), (HTTP, set())])
async def test_traced_workers_load_only_what_they_use(
    nats_url: str, protocol: str, loaded_by_tracing: set[str]
) -> None:
    """With tracing on, a worker loads neither aiohttp (nats-py's websocket transport, ~14 MB)
    nor asyncpg and its tracing (~5 MB): the gateway has no database and NATS_URL takes no
    websocket URL. It loads gRPC only for the OTLP/gRPC exporter; over OTLP/HTTP, as deployed,
    not at all. Either way its spans reach the collector, over that protocol only."""
    with OtlpSink() as sink:
        gateway = await start_gateway(
            nats_url,
            GATEWAY_WORKERS="2",
            GATEWAY_SENDER_MESSAGES_PER_MINUTE="1000",
            **sink.env(sample_ratio=1.0, protocol=protocol),
        )
        try:
            statuses = await asyncio.gather(
                *(_post_on_fresh_connection(f"http://{gateway.address}") for _ in range(10))
            )
            assert statuses == [200] * 10
            for worker in _children(gateway.pid):
                loaded = _mapped_packages(worker, ("grpc", "aiohttp", "yarl", "asyncpg"))
                assert loaded == loaded_by_tracing
        finally:
            assert gateway.stop() == 0, gateway.logs()
        other = next(p for p in PROTOCOLS if p != protocol)
        assert sink.exports[protocol] > 0 and sink.exports[other] == 0
