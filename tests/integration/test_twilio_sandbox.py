"""The Twilio sandbox, driven over real sockets by the official `twilio` client through
`infra.twilio_http`: messages, validation, auth, injected faults and signed status callbacks."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from infra.twilio_http import (
    TwilioOutcomeUnknownError,
    TwilioUnreachableError,
    capture_twilio_response,
    make_twilio_client,
    retry_after_s,
)
from tools.stack import RunningService, start_sandbox

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "sandbox-test-token"
OTHER_ACCOUNT_SID = "AC" + "2" * 32
OTHER_AUTH_TOKEN = "other-test-token"
SENDER = "whatsapp:+14155238886"


@pytest.fixture(scope="module")
async def sandbox() -> AsyncIterator[RunningService]:
    process = await start_sandbox({ACCOUNT_SID: AUTH_TOKEN, OTHER_ACCOUNT_SID: OTHER_AUTH_TOKEN})
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
async def control(sandbox: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=5) as client:
        yield client


@pytest.fixture(autouse=True)
async def fresh_sandbox(control: httpx.AsyncClient) -> None:
    assert (await control.post("/_sandbox/reset")).status_code == 204


@pytest.fixture
async def twilio(sandbox: RunningService) -> AsyncIterator[Client]:
    client = make_twilio_client(ACCOUNT_SID, AUTH_TOKEN, sandbox.url, timeout_s=5)
    yield client
    await client.http_client.close()


async def set_faults(control: httpx.AsyncClient, **faults: Any) -> None:
    response = await control.post("/_sandbox/faults", json=faults)
    assert response.status_code == 200, response.text


async def recorded(control: httpx.AsyncClient) -> list[dict[str, Any]]:
    return (await control.get("/_sandbox/messages")).json()["messages"]


async def stats(control: httpx.AsyncClient) -> dict[str, Any]:
    return (await control.get("/_sandbox/stats")).json()


async def send(client: Client, to: str = "whatsapp:+33612345678", **kwargs: Any) -> Any:
    kwargs.setdefault("body", "Your order A12 is reserved")
    return await client.messages.create_async(to=to, from_=SENDER, **kwargs)


async def test_create_with_body_answers_a_queued_twilio_message(
    twilio: Client, control: httpx.AsyncClient
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    message = await send(twilio, status_callback="http://127.0.0.1:9/status")
    assert re.fullmatch(r"SM[0-9a-f]{32}", message.sid)
    assert message.status == "queued"
    assert message.to == "whatsapp:+33612345678"
    assert message.from_ == SENDER
    assert message.body == "Your order A12 is reserved"
    assert message.account_sid == ACCOUNT_SID
    assert message.error_code is None
    assert message.num_segments == "1"
    assert message.uri == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{message.sid}.json"
    assert message.date_created is not None and message.date_created >= before
    [stored] = await recorded(control)
    assert stored["sid"] == message.sid
    assert stored["status_callback"] == "http://127.0.0.1:9/status"


async def test_create_with_content_sid_records_the_template(
    twilio: Client, control: httpx.AsyncClient
) -> None:
    variables = json.dumps({"1": "A12", "2": "12,50 €"})
    message = await twilio.messages.create_async(
        to="whatsapp:+33612345678",
        messaging_service_sid="MG" + "3" * 32,
        content_sid="HX" + "4" * 32,
        content_variables=variables,
    )
    assert message.messaging_service_sid == "MG" + "3" * 32
    [stored] = await recorded(control)
    assert stored["content_sid"] == "HX" + "4" * 32
    assert json.loads(stored["content_variables"]) == {"1": "A12", "2": "12,50 €"}


async def test_fetch_returns_the_created_message_and_404_for_unknown(twilio: Client) -> None:
    created = await send(twilio)
    fetched = await twilio.messages(created.sid).fetch_async()
    assert (fetched.sid, fetched.body, fetched.status) == (created.sid, created.body, "queued")
    with pytest.raises(TwilioRestException) as raised:
        await twilio.messages("SM" + "0" * 32).fetch_async()
    assert (raised.value.status, raised.value.code) == (404, 20404)


async def test_list_filters_by_recipient_and_sent_date_across_pages(twilio: Client) -> None:
    alice, bob = "whatsapp:+33611111111", "whatsapp:+33622222222"
    sent_to_alice = [(await send(twilio, to=alice, body=f"msg {i}")).sid for i in range(5)]
    await send(twilio, to=bob)
    since = datetime.now(UTC) - timedelta(minutes=1)

    # page_size=2 makes the client follow next_page_uri through the base-URL rewrite.
    listed = await twilio.messages.list_async(to=alice, date_sent_after=since, page_size=2)
    assert [m.sid for m in listed] == list(reversed(sent_to_alice))  # newest first
    assert await twilio.messages.list_async(to=alice, date_sent_before=since) == []
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assert await twilio.messages.list_async(to=alice, date_sent_after=tomorrow) == []
    assert len(await twilio.messages.list_async(from_=SENDER)) == 6


async def test_messages_of_one_account_are_invisible_to_another(sandbox: RunningService) -> None:
    first = make_twilio_client(ACCOUNT_SID, AUTH_TOKEN, sandbox.url, timeout_s=5)
    other = make_twilio_client(OTHER_ACCOUNT_SID, OTHER_AUTH_TOKEN, sandbox.url, timeout_s=5)
    try:
        message = await send(first)
        assert await other.messages.list_async() == []
        with pytest.raises(TwilioRestException) as raised:
            await other.messages(message.sid).fetch_async()
        assert raised.value.code == 20404
    finally:
        await first.http_client.close()
        await other.http_client.close()


@pytest.mark.parametrize(
    ("account_sid", "token"),
    [(ACCOUNT_SID, "wrong-token"), ("AC" + "9" * 32, AUTH_TOKEN), (OTHER_ACCOUNT_SID, AUTH_TOKEN)],
)
async def test_bad_credentials_are_refused_with_20003(
    sandbox: RunningService, control: httpx.AsyncClient, account_sid: str, token: str
) -> None:
    client = make_twilio_client(account_sid, token, sandbox.url, timeout_s=5)
    try:
        with pytest.raises(TwilioRestException) as raised:
            await send(client)
    finally:
        await client.http_client.close()
    assert (raised.value.status, raised.value.code) == (401, 20003)
    assert await recorded(control) == []


@pytest.mark.parametrize(
    ("to", "body", "code"),
    [
        ("", "hello", 21604),
        ("+12", "hello", 21211),
        ("whatsapp:0612345678", "hi", 21211),
        ("+33612345678", None, 21602),
        ("+33612345678", "x" * 1601, 21617),
    ],
)
async def test_invalid_requests_get_twilio_validation_codes(
    twilio: Client, control: httpx.AsyncClient, to: str, body: str | None, code: int
) -> None:
    with pytest.raises(TwilioRestException) as raised:
        await twilio.messages.create_async(to=to, from_=SENDER, body=body)
    assert (raised.value.status, raised.value.code) == (400, code)
    assert await recorded(control) == []


async def test_injected_server_error_is_a_rest_exception_with_its_status(
    twilio: Client, control: httpx.AsyncClient
) -> None:
    await set_faults(control, error_rate=1.0, error_status=503)
    with pytest.raises(TwilioRestException) as raised:
        await send(twilio)
    assert (raised.value.status, raised.value.code) == (503, 20500)
    assert await recorded(control) == []
    assert (await stats(control))["rejected_by_fault"] == {"server_error": 1}


async def test_rate_limit_exposes_retry_after_through_the_capture(
    twilio: Client, control: httpx.AsyncClient
) -> None:
    await set_faults(control, rate_limit_rate=1.0, retry_after_s=7)
    with capture_twilio_response() as captured, pytest.raises(TwilioRestException) as raised:
        await send(twilio)
    assert (raised.value.status, raised.value.code) == (429, 20429)
    assert captured.response is not None and captured.response.status_code == 429
    assert retry_after_s(captured.response) == 7.0

    # The capture still sees the response when the call runs in a copied context (wait_for).
    await set_faults(control, rate_limit_rate=1.0, retry_after_s=2)
    with capture_twilio_response() as captured, pytest.raises(TwilioRestException):
        await asyncio.wait_for(send(twilio), timeout=5)
    assert retry_after_s(captured.response) == 2.0


async def test_permanent_error_codes_are_answered_per_recipient(
    twilio: Client, control: httpx.AsyncClient
) -> None:
    codes = {"+33600000001": 21610, "whatsapp:+33600000002": 21211, "+33600000003": 63016}
    await set_faults(control, error_code_for=codes)
    for to, code in [
        ("whatsapp:+33600000001", 21610),
        ("whatsapp:+33600000002", 21211),
        ("+33600000003", 63016),
    ]:
        with pytest.raises(TwilioRestException) as raised:
            await send(twilio, to=to)
        assert (raised.value.status, raised.value.code) == (400, code), to
    accepted = await send(twilio, to="whatsapp:+33600000004")
    assert [m["sid"] for m in await recorded(control)] == [accepted.sid]


async def test_timeout_after_accept_raises_outcome_unknown_yet_the_message_exists(
    sandbox: RunningService, control: httpx.AsyncClient
) -> None:
    await set_faults(control, timeout_after_accept_rate=1.0, timeout_s=30)
    impatient = make_twilio_client(ACCOUNT_SID, AUTH_TOKEN, sandbox.url, timeout_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(TwilioOutcomeUnknownError):
            await send(impatient, to="whatsapp:+33633333333")
        assert time.monotonic() - started < 5
        await set_faults(control)
        found = await impatient.messages.list_async(
            to="whatsapp:+33633333333", date_sent_after=datetime.now(UTC) - timedelta(minutes=1)
        )
    finally:
        await impatient.http_client.close()
    assert [m.sid for m in found] == [m["sid"] for m in await recorded(control)]
    assert len(found) == 1
    assert (await stats(control))["timeouts_after_accept"] == 1


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_unreachable_api_raises_unreachable_error() -> None:
    client = make_twilio_client(
        ACCOUNT_SID, AUTH_TOKEN, f"http://127.0.0.1:{closed_port()}", timeout_s=2
    )
    try:
        with pytest.raises(TwilioUnreachableError):
            await send(client)
    finally:
        await client.http_client.close()


async def test_seeded_faults_give_the_same_outcomes_on_every_run(
    twilio: Client, control: httpx.AsyncClient
) -> None:
    async def outcomes() -> list[int]:
        await set_faults(control, seed=1, error_rate=0.3, rate_limit_rate=0.1)
        seen = []
        for _ in range(30):
            try:
                await send(twilio)
                seen.append(201)
            except TwilioRestException as exc:
                seen.append(exc.status)
        return seen

    first = await outcomes()
    assert first == await outcomes()
    assert {201, 429, 500} == set(first)
    assert (await stats(control))["accepted"] == 2 * first.count(201)


@dataclass
class CallbackReceiver:
    url: str
    received: list[tuple[dict[str, str], str]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5), self.arrived:
            await self.arrived.wait_for(lambda: len(self.received) >= count)


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    """A tiny HTTP server standing in for the gateway's status webhook."""
    state = CallbackReceiver(url="")

    async def status_webhook(request: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await request.post()).items()}
        async with state.arrived:
            state.received.append((form, request.headers.get("X-Twilio-Signature", "")))
            state.arrived.notify_all()
        return web.Response(text="<Response/>", content_type="text/xml")

    app = web.Application()
    app.router.add_post("/webhooks/twilio/status", status_webhook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}/webhooks/twilio/status"
    yield state
    await runner.cleanup()


async def test_auto_callbacks_are_signed_and_posted_in_order(
    twilio: Client, control: httpx.AsyncClient, receiver: CallbackReceiver
) -> None:
    await set_faults(control, auto_callbacks=["sent", "delivered", "read"])
    message = await send(twilio, status_callback=receiver.url)
    await receiver.wait_for(3)

    validator = RequestValidator(AUTH_TOKEN)
    for params, signature in receiver.received:
        assert validator.validate(receiver.url, params, signature)
        assert not RequestValidator(OTHER_AUTH_TOKEN).validate(receiver.url, params, signature)
        assert params["MessageSid"] == message.sid
        assert params["AccountSid"] == ACCOUNT_SID
        assert (params["From"], params["To"]) == (SENDER, message.to)
        assert "ErrorCode" not in params
    assert [p["MessageStatus"] for p, _ in receiver.received] == ["sent", "delivered", "read"]
    assert (await twilio.messages(message.sid).fetch_async()).status == "read"
    assert (await stats(control))["callbacks"] == {"sent": 3, "failed": 0}


async def test_on_demand_callback_posts_a_signed_failure_with_its_error_code(
    twilio: Client, control: httpx.AsyncClient, receiver: CallbackReceiver
) -> None:
    message = await send(twilio, status_callback=receiver.url)
    response = await control.post(
        f"/_sandbox/messages/{message.sid}/callback",
        json={"status": "failed", "error_code": 63016},
    )
    assert response.json() == {"sid": message.sid, "status": "failed", "callback_status": 200}
    [(params, signature)] = receiver.received
    assert RequestValidator(AUTH_TOKEN).validate(receiver.url, params, signature)
    assert (params["MessageStatus"], params["ErrorCode"]) == ("failed", "63016")
    fetched = await twilio.messages(message.sid).fetch_async()
    assert (fetched.status, fetched.error_code) == ("failed", 63016)


async def test_undeliverable_callback_still_moves_the_status_and_counts_a_failure(
    twilio: Client, control: httpx.AsyncClient
) -> None:
    message = await send(twilio, status_callback=f"http://127.0.0.1:{closed_port()}/status")
    response = await control.post(
        f"/_sandbox/messages/{message.sid}/callback", json={"status": "delivered"}
    )
    assert response.json()["callback_status"] == 0
    assert (await stats(control))["callbacks"] == {"sent": 0, "failed": 1}
    assert (await twilio.messages(message.sid).fetch_async()).status == "delivered"


async def test_control_endpoints_reject_malformed_requests(
    twilio: Client, control: httpx.AsyncClient
) -> None:
    bad_faults = await control.post("/_sandbox/faults", json={"error_rate": 2})
    assert bad_faults.status_code == 400
    assert bad_faults.text == "error_rate must be a number between 0 and 1"
    assert (await control.post("/_sandbox/faults", json={"errors": 1})).status_code == 400
    message = await send(twilio)  # no StatusCallback
    sent = {"status": "sent"}
    no_callback = await control.post(f"/_sandbox/messages/{message.sid}/callback", json=sent)
    assert no_callback.status_code == 409
    unknown = await control.post(f"/_sandbox/messages/SM{'0' * 32}/callback", json=sent)
    assert unknown.status_code == 404
    with_callback = await send(twilio, status_callback="http://127.0.0.1:9/status")
    for bad in ({}, {"status": "seen"}, {"status": "failed", "error_code": "63016"}):
        response = await control.post(f"/_sandbox/messages/{with_callback.sid}/callback", json=bad)
        assert response.status_code == 400, bad
