"""The gateway process against a real NATS JetStream, with signatures from the twilio SDK."""

from __future__ import annotations

import asyncio
import json
import uuid
from urllib.parse import urlencode

import httpx
import pytest
from snapsell.common.v1.address_pb2 import Channel
from snapsell.gateway.v1.events_pb2 import MessageReceived, StatusReceived

from tests.support import twilio
from tests.support.twilio import ACCOUNT_SID, OTHER_ACCOUNT_SID, OTHER_AUTH_TOKEN, whatsapp_params

MESSAGES = "/webhooks/twilio/messages"
STATUS = "/webhooks/twilio/status"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def sign(path: str, params: dict[str, str], token: str = twilio.AUTH_TOKEN) -> str:
    return twilio.sign("https://hooks.example.com/snapsell" + path, params, token)


async def post(
    http: httpx.AsyncClient, path: str, params: dict[str, str], *, signature: str | None = None
) -> httpx.Response:
    headers = dict(FORM)
    headers["X-Twilio-Signature"] = sign(path, params) if signature is None else signature
    return await http.post(path, content=urlencode(params), headers=headers)


async def stream_tail(js, since: int) -> list:
    """Every INBOUND message stored after sequence `since`."""
    last = (await js.stream_info("INBOUND")).state.last_seq
    return [await js.get_msg("INBOUND", seq) for seq in range(since + 1, last + 1)]


async def last_seq(js) -> int:
    return (await js.stream_info("INBOUND")).state.last_seq


async def test_signed_message_is_published_once_with_its_fields(http, js) -> None:
    before = await last_seq(js)
    params = whatsapp_params()
    reply = await post(http, MESSAGES, params)

    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/xml")
    assert reply.text == '<?xml version="1.0" encoding="UTF-8"?><Response/>'
    [stored] = await stream_tail(js, before)
    assert stored.subject == "gateway.v1.message.received"
    assert stored.headers["Nats-Msg-Id"] == params["MessageSid"]
    message = MessageReceived.FromString(stored.data)
    assert message.message_sid == params["MessageSid"]
    assert message.account_sid == ACCOUNT_SID
    assert (message.sender.channel, message.sender.value) == (
        Channel.CHANNEL_WHATSAPP,
        "+33612345678",
    )
    assert message.recipient.value == "+14155238886"
    assert message.body == "A12"
    assert message.profile_name == "Aïcha 🛍️"
    assert message.wa_id == "33612345678"
    assert [(m.url, m.content_type) for m in message.media] == [
        ("https://api.twilio.com/media/ME1", "image/jpeg")
    ]
    assert message.other_params["ChannelMetadata"] == '{"type":"whatsapp"}'
    assert message.other_params["SmsStatus"] == "received"
    assert message.received_at.seconds > 0


async def test_whatsapp_user_id_sender_is_kept_as_given(http, js) -> None:
    before = await last_seq(js)
    params = whatsapp_params(From="whatsapp:shop.fan.42", WaId="")
    assert (await post(http, MESSAGES, params)).status_code == 200
    [stored] = await stream_tail(js, before)
    assert MessageReceived.FromString(stored.data).sender.value == "shop.fan.42"


@pytest.mark.parametrize("signature", ["", "bm90IGEgc2lnbmF0dXJl", "tampered"])
async def test_missing_or_bad_signature_is_refused_and_nothing_published(
    http, js, signature: str
) -> None:
    before = await last_seq(js)
    params = whatsapp_params()
    bad = signature if signature != "tampered" else sign(MESSAGES, {**params, "Body": "STOP"})
    headers = dict(FORM)
    if bad:
        headers["X-Twilio-Signature"] = bad
    reply = await http.post(MESSAGES, content=urlencode(params), headers=headers)
    assert reply.status_code == 403
    assert reply.text.strip() == "invalid Twilio signature"
    assert await last_seq(js) == before


async def test_signature_with_another_accounts_token_is_checked_with_that_token(http, js) -> None:
    params = whatsapp_params(AccountSid=OTHER_ACCOUNT_SID)
    assert (await post(http, MESSAGES, params)).status_code == 403  # signed with the default
    good = sign(MESSAGES, params, OTHER_AUTH_TOKEN)
    assert (await post(http, MESSAGES, params, signature=good)).status_code == 200


async def test_other_methods_and_paths_are_answered_by_the_router(http, js) -> None:
    before = await last_seq(js)
    assert (await http.get(MESSAGES)).status_code == 405
    assert (await http.put(STATUS, content=b"x", headers=FORM)).status_code == 405
    params = whatsapp_params()
    unknown = "/webhooks/twilio/other"
    assert (await post(http, unknown, params, signature=sign(unknown, params))).status_code == 404
    assert (await http.get("/healthz")).status_code == 200
    assert await stream_tail(js, before) == []


async def test_same_message_sid_posted_three_times_concurrently_is_stored_once(http, js) -> None:
    before = await last_seq(js)
    params = whatsapp_params()
    replies = await asyncio.gather(*(post(http, MESSAGES, params) for _ in range(3)))
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert len(await stream_tail(js, before)) == 1


async def test_public_url_with_path_prefix_and_query_string_validates(http, js) -> None:
    path = MESSAGES + "?tenant=shop-1&rc=5"
    params = whatsapp_params()
    assert (await post(http, path, params)).status_code == 200
    # The same body signed without the query is not valid for this URL.
    reply = await post(http, path, params, signature=sign(MESSAGES, params))
    assert reply.status_code == 403


async def test_status_callback_is_published_with_sid_and_status_as_id(http, js) -> None:
    before = await last_seq(js)
    sid = "SM" + uuid.uuid4().hex
    params = {
        "MessageSid": sid,
        "MessageStatus": "delivered",
        "AccountSid": ACCOUNT_SID,
        "From": "whatsapp:+14155238886",
        "To": "whatsapp:+33612345678",
        "ChannelPrefix": "whatsapp",
    }
    assert (await post(http, STATUS, params)).status_code == 200
    assert (await post(http, STATUS, params)).status_code == 200  # Twilio retried
    [stored] = await stream_tail(js, before)
    assert stored.subject == "gateway.v1.status.received"
    assert stored.headers["Nats-Msg-Id"] == f"{sid}:delivered"
    status = StatusReceived.FromString(stored.data)
    assert (status.message_sid, status.message_status) == (sid, "delivered")
    assert status.recipient.value == "+33612345678"
    assert status.other_params["ChannelPrefix"] == "whatsapp"


async def test_oversized_body_is_refused_with_413(http) -> None:
    params = whatsapp_params(Body="x" * (70 * 1024))
    reply = await post(http, MESSAGES, params)
    assert reply.status_code == 413


async def test_non_form_body_is_refused_with_415(http) -> None:
    reply = await http.post(MESSAGES, json={"MessageSid": "SM1"})
    assert reply.status_code == 415


@pytest.mark.parametrize("missing", ["MessageSid", "From", "To"])
async def test_signed_body_without_a_required_parameter_is_refused_with_400(
    http, js, missing: str
) -> None:
    before = await last_seq(js)
    params = whatsapp_params()
    del params[missing]
    reply = await post(http, MESSAGES, params)
    assert reply.status_code == 400
    assert missing in reply.text
    assert await last_seq(js) == before


async def logged(gateway, event: str) -> list[dict]:
    """The gateway's log lines for `event`, once there is one (it writes them as it goes)."""
    for _ in range(100):
        lines = [json.loads(line) for line in gateway.logs().splitlines() if event in line]
        if lines:
            return lines
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event} line in the gateway's log")


async def test_a_sender_without_plus_and_country_code_is_refused_with_a_masked_log_line(
    gateway, http, js
) -> None:
    before = await last_seq(js)
    params = whatsapp_params(From="whatsapp:0699887766", WaId="")
    reply = await post(http, MESSAGES, params)
    assert reply.status_code == 400
    assert reply.text.strip() == "From is not an E.164 phone number (+ and country code)"
    assert await last_seq(js) == before
    lines = await logged(gateway, "webhook.refused")
    [line] = [line for line in lines if line["message_sid"] == params["MessageSid"]]
    assert line["from"] == "whatsapp:06******66"
    assert "0699887766" not in gateway.logs()


async def test_a_signature_failure_says_which_url_was_checked(gateway, http) -> None:
    params = whatsapp_params()
    reply = await post(http, MESSAGES, params, signature="bm90IGEgc2lnbmF0dXJl")
    assert reply.status_code == 403
    lines = await logged(gateway, "webhook.signature_invalid")
    assert lines[-1]["checked_url"] == "https://hooks.example.com/snapsell" + MESSAGES


async def test_sender_over_its_rate_gets_empty_twiml_and_is_dropped(http, js) -> None:
    before = await last_seq(js)
    sender = "whatsapp:+3361111" + uuid.uuid4().hex[:4].translate(str.maketrans("abcdef", "123456"))
    replies = [await post(http, MESSAGES, whatsapp_params(From=sender)) for _ in range(8)]
    assert [r.status_code for r in replies] == [200] * 8
    assert len(await stream_tail(js, before)) == 5  # GATEWAY_SENDER_MESSAGES_PER_MINUTE


async def test_health_and_metrics(http) -> None:
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/readyz")).status_code == 200
    text = (await http.get("/metrics")).text
    assert "snapsell_gateway_webhook_requests_total" in text
    assert "snapsell_gateway_jetstream_publish_duration_seconds" in text
