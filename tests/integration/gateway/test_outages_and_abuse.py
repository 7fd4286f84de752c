"""The gateway when NATS goes away, when a source keeps forging signatures, and under
arbitrary form bodies."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlencode

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import twilio
from tests.support.gateway import start_gateway
from tests.support.twilio import whatsapp_params
from tools.devstack import EmbeddedNats

MESSAGES = "/webhooks/twilio/messages"
PUBLIC = "https://hooks.example.com/snapsell" + MESSAGES


def signed(params: dict[str, str]) -> dict[str, str]:
    return {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": twilio.sign(PUBLIC, params),
    }


async def post(
    http: httpx.AsyncClient, params: dict[str, str], headers: dict[str, str] | None = None
) -> int:
    reply = await http.post(MESSAGES, content=urlencode(params), headers=headers or signed(params))
    return reply.status_code


async def test_nats_down_answers_503_and_unready_then_recovers(tmp_path: Path) -> None:
    nats_server = EmbeddedNats(tmp_path / "nats")
    url = await asyncio.to_thread(nats_server.start)
    gateway = await start_gateway(url)
    try:
        async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=10) as http:
            params = whatsapp_params()
            assert await post(http, params) == 200

            await asyncio.to_thread(nats_server.kill)
            down = whatsapp_params()
            assert await post(http, down) == 503
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200

            await asyncio.to_thread(nats_server.start)
            async with asyncio.timeout(15):
                while (await http.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.2)
            # Twilio retries the refused webhook: it is now stored.
            assert await post(http, down) == 200
    finally:
        assert gateway.stop() == 0, gateway.logs()
        await asyncio.to_thread(nats_server.stop)


async def test_source_failing_signatures_is_answered_429(nats_url: str) -> None:
    gateway = await start_gateway(nats_url, GATEWAY_SIGNATURE_FAILURES_LIMIT="3")
    try:
        async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=10) as http:
            forged = {**signed({}), "X-Twilio-Signature": "forged"}
            codes = [await post(http, whatsapp_params(), forged) for _ in range(5)]
            assert codes == [403, 403, 403, 429, 429]
            assert await post(http, whatsapp_params()) == 200  # signed: never blocked
            metrics = (await http.get("/metrics")).text
            assert 'endpoint="messages",outcome="source_blocked"} 2.0' in metrics
    finally:
        assert gateway.stop() == 0


form_text = st.text(st.characters(codec="utf-8"), max_size=200) | st.text(max_size=70_000)
form_params = st.dictionaries(st.text(min_size=1, max_size=30), form_text, max_size=25)


async def test_arbitrary_form_bodies_never_cause_a_server_error(nats_url: str) -> None:
    gateway = await start_gateway(
        nats_url,
        GATEWAY_SIGNATURE_FAILURES_LIMIT="100000",
        GATEWAY_SENDER_MESSAGES_PER_MINUTE="100000",
    )
    results: list[int] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=10) as http:

            @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
            @given(
                params=form_params,
                base=st.booleans(),
                sign_it=st.booleans(),
                raw=st.binary(max_size=300),
                use_raw=st.booleans(),
            )
            def check(params, base, sign_it, raw, use_raw) -> None:
                body_params = {**whatsapp_params(), **params} if base else params
                body = raw if use_raw else urlencode(body_params).encode()
                headers = {"Content-Type": "application/x-www-form-urlencoded"}
                if sign_it and not use_raw:
                    headers["X-Twilio-Signature"] = twilio.sign(PUBLIC, body_params)
                future = asyncio.run_coroutine_threadsafe(
                    http.post(MESSAGES, content=body, headers=headers), loop
                )
                status = future.result(timeout=30).status_code
                results.append(status)
                assert status < 500, status

            loop = asyncio.get_running_loop()
            await asyncio.to_thread(check)
    finally:
        assert gateway.stop() == 0, gateway.logs()
    assert set(results) & {200, 400, 403, 413}, results
    assert "Traceback" not in gateway.logs()
