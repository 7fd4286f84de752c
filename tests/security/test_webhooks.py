"""Twilio webhooks that no attacker can block, replay under a new id, or hold open.

Each test runs a real gateway process in front of the session's NATS JetStream; the attacker
controls the body, the headers and how slowly they arrive, but not Twilio's auth token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import httpx
import nats
import pytest
from multidict import MultiDict
from nats.js import JetStreamContext
from snapsell.gateway.v1.events_pb2 import MessageReceived
from twilio.request_validator import RequestValidator

from infra.config import ConfigError
from services.gateway.config import load_config
from tests.support import twilio
from tests.support.gateway import PUBLIC_BASE_URL, start_gateway
from tests.support.twilio import whatsapp_params
from tools.stack import RunningService

MESSAGES = "/webhooks/twilio/messages"
STATUS = "/webhooks/twilio/status"
FORM = "application/x-www-form-urlencoded"


def headers(params: dict[str, str], url: str = PUBLIC_BASE_URL + MESSAGES) -> dict[str, str]:
    return {"Content-Type": FORM, "X-Twilio-Signature": twilio.sign(url, params)}


JUNK = {"Content-Type": FORM, "X-Twilio-Signature": "forged"}


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


@pytest.fixture
async def gateway(nats_url: str) -> AsyncIterator[RunningService]:
    service = await start_gateway(nats_url)
    yield service
    assert service.stop() == 0, service.logs()


@pytest.fixture
async def http(gateway: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=10) as client:
        yield client


async def last_seq(js: JetStreamContext) -> int:
    return (await js.stream_info("INBOUND")).state.last_seq


async def published_since(js: JetStreamContext, seq: int) -> list[MessageReceived]:
    last = await last_seq(js)
    stored = [await js.get_msg("INBOUND", n) for n in range(seq + 1, last + 1)]
    return [MessageReceived.FromString(m.data) for m in stored if m.subject.endswith("received")]


async def junk_posts(http: httpx.AsyncClient, count: int, **extra: str) -> list[int]:
    codes = []
    for _ in range(count):
        reply = await http.post(
            MESSAGES, content=urlencode(whatsapp_params()), headers={**JUNK, **extra}
        )
        codes.append(reply.status_code)
    return codes


# --- a valid signature is never refused because of other traffic ---------------------------


async def test_valid_signature_after_50_junk_posts_from_its_source_is_published(
    http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    codes = await junk_posts(http, 50)
    assert codes[-1] == 429  # the source is blocked for bad signatures...
    before = await last_seq(js)
    params = whatsapp_params()
    reply = await http.post(MESSAGES, content=urlencode(params), headers=headers(params))
    assert reply.status_code == 200  # ...but a correctly signed webhook still goes through
    assert [m.message_sid for m in await published_since(js, before)] == [params["MessageSid"]]


# --- trusted proxies ---------------------------------------------------------------------------


async def test_limits_count_the_client_a_trusted_proxy_reports(
    nats_url: str, js: JetStreamContext
) -> None:
    gateway = await start_gateway(
        nats_url, GATEWAY_FORWARDED_ALLOW_IPS="127.0.0.0/8", GATEWAY_SIGNATURE_FAILURES_LIMIT="5"
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=10) as http:
            client_a = {"X-Forwarded-For": "203.0.113.10"}
            client_b = {"X-Forwarded-For": "198.51.100.20"}
            assert (await junk_posts(http, 50, **client_a))[-1] == 429
            # Client B comes through the same proxy: it is not blocked by A's junk...
            assert await junk_posts(http, 1, **client_b) == [403]
            # ...and valid webhooks from B (and from A) are published.
            before = await last_seq(js)
            sent = []
            for client in (client_b, client_b, client_a):
                params = whatsapp_params(From=f"whatsapp:+3361234{len(sent):04d}")
                reply = await http.post(
                    MESSAGES, content=urlencode(params), headers={**headers(params), **client}
                )
                assert reply.status_code == 200
                sent.append(params["MessageSid"])
            assert [m.message_sid for m in await published_since(js, before)] == sent
    finally:
        assert gateway.stop() == 0, gateway.logs()


async def test_forged_forwarded_for_from_an_untrusted_peer_does_not_shift_the_key(
    nats_url: str,
) -> None:
    gateway = await start_gateway(
        nats_url, GATEWAY_FORWARDED_ALLOW_IPS="10.0.0.0/8", GATEWAY_SIGNATURE_FAILURES_LIMIT="3"
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=10) as http:
            codes = [
                (await junk_posts(http, 1, **{"X-Forwarded-For": f"203.0.113.{n}"}))[0]
                for n in range(5)
            ]
            assert codes == [403, 403, 403, 429, 429]  # all counted against the real peer
    finally:
        assert gateway.stop() == 0, gateway.logs()


@pytest.mark.parametrize("value", ["*", "127.0.0.1,*", "ingress", "10.0.0.0/33"])
def test_trusting_every_proxy_or_a_malformed_range_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("PUBLIC_BASE_URL", PUBLIC_BASE_URL)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "token")
    monkeypatch.setenv("GATEWAY_FORWARDED_ALLOW_IPS", value)
    with pytest.raises(ConfigError, match="GATEWAY_FORWARDED_ALLOW_IPS"):
        load_config()


# --- boundary-shifting and repeated parameters -------------------------------------------------


async def test_boundary_shifted_message_sid_with_a_valid_signature_is_refused(
    http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    original = whatsapp_params()
    signature = twilio.sign(PUBLIC_BASE_URL + MESSAGES, original)
    # MessageSid swallows the parameter sorted right after it: same signed string, new id.
    shifted = dict(original)
    shifted["MessageSid"] = original["MessageSid"] + "MessageType" + shifted.pop("MessageType")
    assert twilio.sign(PUBLIC_BASE_URL + MESSAGES, shifted) == signature

    reply = await http.post(MESSAGES, content=urlencode(original), headers=headers(original))
    assert reply.status_code == 200
    before = await last_seq(js)
    forged = {"Content-Type": FORM, "X-Twilio-Signature": signature}
    reply = await http.post(MESSAGES, content=urlencode(shifted), headers=forged)
    assert reply.status_code == 400
    assert reply.text == "MessageSid is not a Twilio SID\n"
    assert await last_seq(js) == before


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AccountSid", twilio.ACCOUNT_SID + "ApiVersion2010-04-01"),
        ("SmsSid", "SM" + "A" * 32),
        ("MessagingServiceSid", "MG123"),
    ],
)
async def test_signed_sids_of_the_wrong_shape_are_refused(
    http: httpx.AsyncClient, js: JetStreamContext, name: str, value: str
) -> None:
    params = whatsapp_params(**{name: value})
    before = await last_seq(js)
    reply = await http.post(MESSAGES, content=urlencode(params), headers=headers(params))
    assert (reply.status_code, reply.text) == (400, f"{name} is not a Twilio SID\n")
    assert await last_seq(js) == before


async def test_repeated_parameter_with_a_valid_signature_is_refused(
    http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    pairs = MultiDict(whatsapp_params())
    pairs.add("Body", "B7")
    signature = RequestValidator(twilio.AUTH_TOKEN).compute_signature(
        PUBLIC_BASE_URL + MESSAGES, pairs
    )
    before = await last_seq(js)
    reply = await http.post(
        MESSAGES,
        content=urlencode(list(pairs.items())),
        headers={"Content-Type": FORM, "X-Twilio-Signature": signature},
    )
    assert (reply.status_code, reply.text) == (400, "repeated parameter Body\n")
    assert await last_seq(js) == before


async def test_unknown_new_parameters_stay_accepted(http: httpx.AsyncClient) -> None:
    params = whatsapp_params(SomethingTwilioAddsLater="x")
    reply = await http.post(MESSAGES, content=urlencode(params), headers=headers(params))
    assert reply.status_code == 200


async def test_idempotency_token_is_published_with_the_message(
    http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    params = whatsapp_params()
    token = "a1b2c3d4-e5f6-4789-abcd-ef0123456789"
    before = await last_seq(js)
    reply = await http.post(
        MESSAGES,
        content=urlencode(params),
        headers={**headers(params), "I-Twilio-Idempotency-Token": token},
    )
    assert reply.status_code == 200
    [message] = await published_since(js, before)
    assert (message.message_sid, message.idempotency_token) == (params["MessageSid"], token)


# --- the default port ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("public_base_url", "signed_url"),
    [
        ("https://hooks.example.com/snapsell", "https://hooks.example.com:443/snapsell"),
        ("https://hooks.example.com:443/snapsell", "https://hooks.example.com/snapsell"),
        ("http://hooks.example.com/snapsell", "http://hooks.example.com:80/snapsell"),
    ],
)
async def test_signature_with_or_without_the_default_port_is_accepted(
    nats_url: str, public_base_url: str, signed_url: str
) -> None:
    gateway = await start_gateway(nats_url, PUBLIC_BASE_URL=public_base_url)
    try:
        async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=10) as http:
            params = whatsapp_params()
            reply = await http.post(
                MESSAGES, content=urlencode(params), headers=headers(params, signed_url + MESSAGES)
            )
            assert reply.status_code == 200
            other_host = headers(params, "https://evil.example.com:443/snapsell" + MESSAGES)
            reply = await http.post(MESSAGES, content=urlencode(params), headers=other_host)
            assert reply.status_code == 403
    finally:
        assert gateway.stop() == 0, gateway.logs()


# --- slow bodies and connection cap ------------------------------------------------------------


async def stalled_request(address: str, timeout_s: float) -> bytes:
    """Headers and half the declared body, then silence; what the gateway answers, up to EOF."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    body = urlencode(whatsapp_params()).encode()
    writer.write(
        f"POST {MESSAGES} HTTP/1.1\r\nHost: {address}\r\nContent-Type: {FORM}\r\n"
        f"X-Twilio-Signature: forged\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[: len(body) // 2]
    )
    await writer.drain()
    try:
        async with asyncio.timeout(timeout_s):
            return await reader.read()  # until the gateway closes the connection
    finally:
        writer.close()


async def test_stalled_body_is_cut_with_408_and_not_counted_as_a_bad_signature(
    nats_url: str,
) -> None:
    gateway = await start_gateway(
        nats_url,
        GATEWAY_BODY_READ_TIMEOUT_SECONDS="0.5",
        GATEWAY_SIGNATURE_FAILURES_LIMIT="1",
    )
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answers = await asyncio.gather(*(stalled_request(gateway.address, 5) for _ in range(3)))
        assert loop.time() - started < 3
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408 "), answer
        async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=10) as http:
            # The source's first bad signature is still its first: 403, then blocked.
            assert await junk_posts(http, 2) == [403, 429]
    finally:
        assert gateway.stop() == 0, gateway.logs()


async def test_connections_past_the_cap_are_refused_not_queued(nats_url: str) -> None:
    gateway = await start_gateway(nats_url, GATEWAY_MAX_CONNECTIONS="4")
    host, port = gateway.address.rsplit(":", 1)
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
    try:
        await asyncio.sleep(0.3)  # the gateway has accepted them
        async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=5) as http:
            params = whatsapp_params()
            reply = await http.post(MESSAGES, content=urlencode(params), headers=headers(params))
            assert reply.status_code == 503
        for _, writer in idle:
            writer.close()
        idle = []
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=5) as http:
            reply = await http.post(MESSAGES, content=urlencode(params), headers=headers(params))
            assert reply.status_code == 200
    finally:
        for _, writer in idle:
            writer.close()
        assert gateway.stop() == 0, gateway.logs()


# --- the status endpoint's own limits ----------------------------------------------------------


def status_params(**overrides: str) -> dict[str, str]:
    params = {
        "MessageSid": whatsapp_params()["MessageSid"],
        "MessageStatus": "delivered",
        "AccountSid": twilio.ACCOUNT_SID,
        "From": "whatsapp:+14155238886",
        "To": "whatsapp:+33612345678",
        "ApiVersion": "2010-04-01",
    }
    params.update(overrides)
    return params


async def test_status_endpoint_has_its_own_bad_signature_counter(nats_url: str) -> None:
    gateway = await start_gateway(
        nats_url,
        GATEWAY_SIGNATURE_FAILURES_LIMIT="3",
        GATEWAY_STATUS_SIGNATURE_FAILURES_LIMIT="3",
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://{gateway.address}", timeout=10) as http:
            assert (await junk_posts(http, 5))[-1] == 429
            codes = [
                (
                    await http.post(STATUS, content=urlencode(status_params()), headers=JUNK)
                ).status_code
                for _ in range(5)
            ]
            assert codes == [403, 403, 403, 429, 429]
    finally:
        assert gateway.stop() == 0, gateway.logs()


async def test_status_endpoint_has_its_own_body_limit(http: httpx.AsyncClient) -> None:
    big = "x" * 20_000  # under the messages limit (64 KiB), over the status one (16 KiB)
    params = status_params(ErrorMessage=big)
    url = PUBLIC_BASE_URL + STATUS
    reply = await http.post(STATUS, content=urlencode(params), headers=headers(params, url))
    assert reply.status_code == 413
    message = whatsapp_params(Body=big)
    reply = await http.post(MESSAGES, content=urlencode(message), headers=headers(message))
    assert reply.status_code == 200
