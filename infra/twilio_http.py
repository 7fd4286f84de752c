"""The official `twilio` client pointed at any base URL (Twilio itself or the local sandbox).

Exceptions raised by a call such as `client.messages.create_async(...)`:

- `twilio.base.exceptions.TwilioRestException` — Twilio answered with an HTTP error
  (`.status`, `.code`); its headers (e.g. `Retry-After` on 429) are read with
  `capture_twilio_response()`.
- `TwilioTransportError` — no HTTP answer was read. Two kinds, because they call for
  different handling by a sender:
  - `TwilioUnreachableError`: the request never reached Twilio (connection refused,
    DNS, connect timeout); resending cannot create a duplicate.
  - `TwilioOutcomeUnknownError`: the request was sent but the answer was lost (timeout,
    connection dropped); Twilio may have accepted the message.
"""

from __future__ import annotations

import contextlib
import email.utils
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp
from aiohttp.typedefs import Query
from twilio.base.exceptions import TwilioException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

TWILIO_API_ORIGIN = "https://api.twilio.com"


class TwilioTransportError(TwilioException):  # type: ignore[misc]  # twilio has no types
    """No HTTP response was received from the Twilio API."""


class TwilioUnreachableError(TwilioTransportError):
    """The request was not delivered; sending it again cannot duplicate a message."""


class TwilioOutcomeUnknownError(TwilioTransportError):
    """The request was sent but no answer came back; the message may exist at Twilio."""


@dataclass(slots=True)
class CapturedResponse:
    """Filled with the raw response of the last Twilio call made inside the capture."""

    response: Response | None = None


# A mutable holder rather than the response itself: the SDK call may run in a task copied from
# the caller's context (asyncio.wait_for on 3.11), and a holder is shared across that copy.
_capture: ContextVar[CapturedResponse | None] = ContextVar("twilio_response_capture", default=None)


@contextlib.contextmanager
def capture_twilio_response() -> Iterator[CapturedResponse]:
    """Expose the raw response (status, headers) of Twilio calls made in this block."""
    holder = CapturedResponse()
    token = _capture.set(holder)
    try:
        yield holder
    finally:
        _capture.reset(token)


def retry_after_s(response: Response | None) -> float | None:
    """The `Retry-After` delay of a response in seconds (delta-seconds or HTTP-date form)."""
    if response is None or response.headers is None:
        return None
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class TwilioApiHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]  # twilio has no types
    """aiohttp transport for the SDK: one pooled session, a default timeout, any base URL."""

    session: aiohttp.ClientSession | None  # the SDK's attribute: ours, once created

    def __init__(
        self,
        api_base_url: str = TWILIO_API_ORIGIN,
        *,
        timeout_s: float | None = None,
        max_connections: int = 100,
    ) -> None:
        # pool_connections=False: aiohttp sessions must be created inside a running loop, so
        # ours is created on first use instead of in the SDK's constructor.
        super().__init__(pool_connections=False, timeout=timeout_s)
        self.api_base_url = api_base_url.rstrip("/")
        self._max_connections = max_connections
        self._http: aiohttp.ClientSession | None = None
        self._auth_headers: dict[tuple[str, str], str] = {}

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections)
            self._http = aiohttp.ClientSession(connector=connector)
            self.session = self._http
        return self._http

    def _authorization(self, auth: tuple[str, str]) -> str:
        header = self._auth_headers.get(auth)
        if header is None:
            header = self._auth_headers[auth] = aiohttp.encode_basic_auth(*auth)
        return header

    def _rewrite(self, url: str) -> str:
        if url.startswith(TWILIO_API_ORIGIN) and self.api_base_url != TWILIO_API_ORIGIN:
            return self.api_base_url + url[len(TWILIO_API_ORIGIN) :]
        return url

    async def request(
        self,
        method: str,
        url: str,
        params: Query = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the SDK's signature
        allow_redirects: bool = False,
    ) -> Response:
        # The SDK's own async client ignores its constructor timeout; apply it here.
        if timeout is None:
            timeout = self.timeout
        if timeout is not None and timeout <= 0:
            raise ValueError(timeout)
        headers = dict(headers) if headers else {}
        if auth is not None:
            headers["Authorization"] = self._authorization(auth)
        body = None
        if data:
            # Encoding the form here skips aiohttp's FormData machinery, a large share of the
            # client's CPU per message.
            body = urlencode(data, doseq=True).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        try:
            async with self._session().request(
                method.upper(),
                self._rewrite(url),
                params=params,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=allow_redirects,
            ) as raw:
                response = Response(raw.status, await raw.text(), raw.headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise TwilioUnreachableError(f"Twilio API unreachable: {exc}") from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            kind = "timed out" if isinstance(exc, TimeoutError) else "failed"
            raise TwilioOutcomeUnknownError(f"Twilio API call {kind}: {exc!r}") from exc
        holder = _capture.get()
        if holder is not None:
            holder.response = response
        return response

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
            self.session = None


def make_twilio_client(
    account_sid: str,
    auth_token: str,
    api_base_url: str = TWILIO_API_ORIGIN,
    *,
    timeout_s: float,
    max_connections: int = 100,
) -> Client:
    """A `twilio.rest.Client` for the `*_async` methods.

    Close it with `await client.http_client.close()`.
    """
    http = TwilioApiHttpClient(api_base_url, timeout_s=timeout_s, max_connections=max_connections)
    return Client(account_sid, auth_token, http_client=http)
