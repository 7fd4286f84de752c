"""Signed status callbacks, posted the way Twilio posts them to a message's StatusCallback URL."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import aiohttp
from twilio.request_validator import RequestValidator

from tools.twilio_sandbox.store import API_VERSION, SandboxStats, SentMessage

CALLBACK_TIMEOUT_S = 10.0


def status_callback_params(message: SentMessage) -> dict[str, str]:
    params = {
        "AccountSid": message.account_sid,
        "ApiVersion": API_VERSION,
        "From": message.from_ or "",
        "MessageSid": message.sid,
        "MessageStatus": message.status,
        "SmsSid": message.sid,
        "SmsStatus": message.status,
        "To": message.to,
    }
    if message.messaging_service_sid:
        params["MessagingServiceSid"] = message.messaging_service_sid
    if message.error_code is not None:
        params["ErrorCode"] = str(message.error_code)
    return params


class StatusCallbacks:
    """Posts callbacks with one shared HTTP session; at most `concurrency` in flight."""

    def __init__(
        self, auth_tokens: Mapping[str, str], stats: SandboxStats, *, concurrency: int = 64
    ) -> None:
        self._validators = {sid: RequestValidator(token) for sid, token in auth_tokens.items()}
        self._stats = stats
        self._slots = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop, so the app also works in-process
        # under a test transport that runs no lifespan.
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def cancel_pending(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.cancel_pending()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, message: SentMessage, status: str, error_code: int | None = None) -> int:
        """Move the message to `status` and post its callback; the receiver's HTTP status or 0."""
        assert message.status_callback is not None
        message.status = status
        message.error_code = error_code
        message.updated_at = datetime.now(UTC)
        params = status_callback_params(message)
        signature = self._validators[message.account_sid].compute_signature(
            message.status_callback, params
        )
        async with self._slots:
            try:
                async with self._http().post(
                    message.status_callback,
                    data=params,
                    headers={"X-Twilio-Signature": signature},
                ) as response:
                    await response.read()
                    code = response.status
            except (aiohttp.ClientError, TimeoutError):
                code = 0
        if 200 <= code < 300:
            self._stats.callbacks_sent += 1
        else:
            self._stats.callbacks_failed += 1
        return code

    def post_in_background(
        self, message: SentMessage, statuses: Sequence[str], delay_s: float
    ) -> None:
        """Post each status in order, `delay_s` apart, without holding up the API answer."""
        sequence = self._post_sequence(message, statuses, delay_s)
        task = asyncio.get_running_loop().create_task(sequence)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post_sequence(
        self, message: SentMessage, statuses: Sequence[str], delay_s: float
    ) -> None:
        for status in statuses:
            if delay_s:
                await asyncio.sleep(delay_s)
            # Twilio always reports why a message failed; 30008 is its "unknown error".
            error_code = 30008 if status in ("failed", "undelivered") else None
            await self.post(message, status, error_code)
