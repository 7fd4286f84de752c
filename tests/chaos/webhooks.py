"""Inbound load as Twilio produces it: signed webhooks, each retried with the same MessageSid and
signature until the gateway answers 200 (a 503 while NATS is away, a refused or dropped
connection while the gateway is dead), so every webhook is eventually accepted once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from tests.support.twilio import sign

WEBHOOK_PATH = "/webhooks/twilio/messages"
_REQUEST_TIMEOUT_S = 10.0
_FIRST_RETRY_S = 0.2
_MAX_RETRY_S = 2.0


@dataclass
class WebhookTally:
    """What the gateway answered, attempt by attempt, and which MessageSids got their 200."""

    answers: Counter[str] = field(default_factory=Counter)  # "200", "503", "ConnectError", ...
    accepted: dict[str, str] = field(default_factory=dict)  # MessageSid -> what it carried
    retried: set[str] = field(default_factory=set)
    posted: int = 0

    @property
    def retries(self) -> int:
        return sum(self.answers.values()) - len(self.accepted)


class WebhookPoster:
    """At most `concurrency` requests in flight; a retry waits outside that limit."""

    def __init__(self, base_url: str, auth_token: str, *, concurrency: int, deadline_s: float):
        self._base_url = base_url
        self._auth_token = auth_token
        self._slots = asyncio.Semaphore(concurrency)
        self._deadline = time.monotonic() + deadline_s
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=_REQUEST_TIMEOUT_S,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.tally = WebhookTally()
        self.progress = asyncio.Condition()

    async def close(self) -> None:
        await self._client.aclose()

    async def post(self, params: dict[str, str], what: str) -> None:
        """Post until answered 200 (raises after the deadline); `what` names it in the audit."""
        sid = params["MessageSid"]
        signature = sign(self._base_url + WEBHOOK_PATH, params, self._auth_token)
        headers = {"X-Twilio-Signature": signature}
        self.tally.posted += 1
        delay = _FIRST_RETRY_S
        while True:
            async with self._slots:
                answer = await self._attempt(params, headers)
            self.tally.answers[answer] += 1
            if answer == "200":
                self.tally.accepted[sid] = what
                async with self.progress:
                    self.progress.notify_all()
                return
            self.tally.retried.add(sid)
            if time.monotonic() > self._deadline:
                raise AssertionError(f"webhook {sid} never answered 200 (last: {answer})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_S)

    async def _attempt(self, params: dict[str, str], headers: dict[str, str]) -> str:
        try:
            reply = await self._client.post(WEBHOOK_PATH, data=params, headers=headers)
        except httpx.HTTPError as error:
            return type(error).__name__
        if reply.status_code == 200 and not reply.text.endswith("<Response/>"):
            return "200 without TwiML"
        return str(reply.status_code)

    async def wait_accepted(self, count: int) -> None:
        """Until at least `count` webhooks have been answered 200."""
        async with self.progress:
            await self.progress.wait_for(lambda: len(self.tally.accepted) >= count)
