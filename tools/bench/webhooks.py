"""Distinct, correctly signed Twilio WhatsApp webhooks for load generation.

Each body carries the 16 fields Twilio sends for an inbound WhatsApp text (same names, same
order, values of realistic length), a unique MessageSid and a distinct sender, so neither
JetStream's de-duplication nor the gateway's per-sender limit changes what is measured. The
signature is the Twilio SDK's own `RequestValidator.compute_signature` over the public URL and
the form parameters, exactly what Twilio puts in `X-Twilio-Signature`.

A MessageSid is `SM` + 32 hex digits: `<batch:2><nonce:8><index:22>`. The batch tells the
stream check which load phase a stored message came from; the nonce keeps runs apart.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote_plus, urlsplit

from twilio.request_validator import RequestValidator

WEBHOOK_PATH = "/webhooks/twilio/messages"
BUSINESS_NUMBER = "+14155238886"
_BODIES = ("A12", "B7", "C301", "Bonjour, il reste du 38 ?", "salut", "je prends le A12 svp", "ok")
_NAMES = ("Awa", "Camille", "Fatou", "Léa", "Moussa", "Nadia", "Yann", "Zoé")


@dataclass(frozen=True)
class SignedWebhook:
    message_sid: str
    body: str  # application/x-www-form-urlencoded
    signature: str


class _Form(dict[str, str]):
    """Form parameters that Twilio's validator reads through `getall` (a MultiDict's method),
    its first try: without it, every value costs a caught exception (a third of the time)."""

    def getall(self, name: str) -> list[str]:
        return [self[name]]


# Most fields repeat from one webhook to the next: each distinct one is quoted once.
_quote_repeated = lru_cache(maxsize=256)(quote_plus)
_UNIQUE = frozenset({"SmsMessageSid", "SmsSid", "MessageSid", "WaId", "From", "ChannelMetadata"})


def _form_body(params: dict[str, str]) -> str:
    """`urlencode(params)`, three times faster (a run signs up to a million webhooks)."""
    return "&".join(
        f"{key}={quote_plus(value) if key in _UNIQUE else _quote_repeated(value)}"
        for key, value in params.items()
    )


def message_sid(batch: int, nonce: int, index: int) -> str:
    return f"SM{batch:02x}{nonce:08x}{index:022x}"


def batch_of(sid: str) -> int | None:
    """The batch number encoded in a MessageSid made by `message_sid`, else None."""
    if len(sid) != 34 or not sid.startswith("SM"):
        return None
    try:
        return int(sid[2:4], 16)
    except ValueError:
        return None


def new_nonce() -> int:
    return secrets.randbits(32)


def _wa_id(index: int) -> str:
    return f"336{index % 100_000_000:08d}"


def shop_number(index: int) -> str:
    """The WhatsApp number of shop number `index` (shop 0's is `BUSINESS_NUMBER`)."""
    return f"+1415523{8886 + index:04d}"


def client_address(index: int) -> str:
    """The WhatsApp address (`From`, and `To` of any reply) of client number `index`."""
    return f"whatsapp:+{_wa_id(index)}"


def whatsapp_params(
    sid: str,
    account_sid: str,
    index: int,
    rng: random.Random,
    body: str | None = None,
    to: str = BUSINESS_NUMBER,
) -> dict[str, str]:
    """The form Twilio posts for one inbound WhatsApp text (field order as Twilio sends it) to
    the shop number `to`; the sender is client number `index`, the text `body` or else one
    drawn from `rng`."""
    wa_id = _wa_id(index)
    name = rng.choice(_NAMES)
    text = rng.choice(_BODIES) if body is None else body
    metadata = {"type": "whatsapp", "data": {"context": {"ProfileName": name, "WaId": wa_id}}}
    return {
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "ProfileName": name,
        "MessageType": "text",
        "SmsSid": sid,
        "WaId": wa_id,
        "SmsStatus": "received",
        "Body": text,
        "To": f"whatsapp:{to}",
        "NumSegments": "1",
        "ReferralNumMedia": "0",
        "MessageSid": sid,
        "AccountSid": account_sid,
        "From": client_address(index),
        "ApiVersion": "2010-04-01",
        "ChannelMetadata": json.dumps(metadata, separators=(",", ":"), ensure_ascii=False),
    }


def signed_webhooks(
    public_url: str,
    account_sid: str,
    auth_token: str,
    *,
    count: int,
    batch: int,
    nonce: int,
    body: str | None = None,
    first_client: int = 0,
    shops: Sequence[str] = (BUSINESS_NUMBER,),
) -> Iterator[SignedWebhook]:
    """`count` distinct webhooks signed for `public_url` (the full URL Twilio would call), from
    clients `first_client`, `first_client + 1`, ... (see `client_address`), to the shop numbers
    `shops` in turn; every text is `body` when given, else a mix of item codes and small talk."""
    validator = RequestValidator(auth_token)
    rng = random.Random(f"{batch}:{nonce}")
    for index in range(count):
        sid = message_sid(batch, nonce, index)
        to = shops[index % len(shops)]
        params = _Form(whatsapp_params(sid, account_sid, first_client + index, rng, body, to))
        signature = validator.compute_signature(public_url, params)
        yield SignedWebhook(sid, _form_body(params), signature)


def raw_request(public_url: str, webhook: SignedWebhook) -> bytes:
    """The HTTP/1.1 request bytes (keep-alive) for one webhook, as a socket client sends them."""
    parts = urlsplit(public_url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    body = webhook.body.encode()
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"X-Twilio-Signature: {webhook.signature}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body
