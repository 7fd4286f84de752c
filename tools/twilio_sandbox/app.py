"""The sandbox's HTTP API: Twilio's Messages resource (2010-04-01) plus `/_sandbox/` controls.

Handlers stay lean (no per-request logging, urlencoded bodies parsed with `parse_qsl`)
because benchmarks drain tens of thousands of messages through this one process.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tools.twilio_sandbox.callbacks import StatusCallbacks
from tools.twilio_sandbox.errors import twilio_error
from tools.twilio_sandbox.faults import (
    CALLBACK_STATUSES,
    FaultConfig,
    FaultConfigError,
    FaultPlan,
    Outcome,
)
from tools.twilio_sandbox.store import (
    API_VERSION,
    DateSentFilter,
    MessageStore,
    SandboxStats,
    SentMessage,
    new_message_sid,
)
from tools.twilio_sandbox.validation import invalid_create_request

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


class Sandbox:
    """State and request handlers of one sandbox instance."""

    def __init__(self, accounts: Mapping[str, str]) -> None:
        if not accounts:
            raise ValueError("the Twilio sandbox needs at least one account SID and auth token")
        self.accounts = dict(accounts)
        self.store = MessageStore()
        self.stats = SandboxStats()
        self.faults = FaultPlan()
        self.callbacks = StatusCallbacks(self.accounts, self.stats)
        # Authorization header value -> account SID, so each request skips base64 decoding.
        self._known_credentials: dict[str, str] = {}

    # --- Twilio REST API -------------------------------------------------------------

    def _authenticate(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        account_sid = self._known_credentials.get(header)
        if account_sid is None:
            account_sid = self._check_basic_auth(header)
            if account_sid is not None:
                self._known_credentials[header] = account_sid
        if account_sid is None or account_sid != request.path_params["account_sid"]:
            self.stats.rejected["unauthorized"] += 1
            return twilio_error(20003, headers={"WWW-Authenticate": 'Basic realm="Twilio API"'})
        return None

    def _check_basic_auth(self, header: str) -> str | None:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user if self.accounts.get(user) == password and password else None

    async def create_message(self, request: Request) -> Response:
        if (denied := self._authenticate(request)) is not None:
            return denied
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        to = form.get("To", "")
        invalid = invalid_create_request(form)
        if invalid is not None:
            self.stats.rejected["invalid_request"] += 1
            return invalid
        config = self.faults.config
        if config.latency_ms:
            await asyncio.sleep(config.latency_ms / 1000)
        code = self.faults.permanent_error_for(to)
        if code is not None:
            self.stats.rejected[f"error_{code}"] += 1
            return twilio_error(code, to=to)
        outcome = self.faults.draw()
        if outcome is Outcome.RATE_LIMIT:
            self.stats.rejected["rate_limited"] += 1
            retry_after = {"Retry-After": f"{config.retry_after_s:g}"}
            return twilio_error(20429, headers=retry_after)
        if outcome is Outcome.SERVER_ERROR:
            self.stats.rejected["server_error"] += 1
            return twilio_error(20500, status=config.error_status)
        message = self._accept(request.path_params["account_sid"], form, to)
        if outcome is Outcome.TIMEOUT_AFTER_ACCEPT:
            self.stats.timeouts_after_accept += 1
            await _hold_until_disconnect(request, config.timeout_s)
        return JSONResponse(message.to_twilio_json(), status_code=201)

    def _accept(self, account_sid: str, form: Mapping[str, str], to: str) -> SentMessage:
        message = SentMessage(
            sid=new_message_sid(),
            account_sid=account_sid,
            to=to,
            from_=form.get("From") or None,
            body=form.get("Body", ""),
            messaging_service_sid=form.get("MessagingServiceSid") or None,
            content_sid=form.get("ContentSid") or None,
            content_variables=form.get("ContentVariables") or None,
            status_callback=form.get("StatusCallback") or None,
            created_at=datetime.now(UTC),
        )
        self.store.add(message)
        self.stats.accepted += 1
        self.stats.accepted_by_to[to] += 1
        config = self.faults.config
        if message.status_callback and config.auto_callbacks:
            self.callbacks.post_in_background(
                message, config.auto_callbacks, config.callback_delay_ms / 1000
            )
        return message

    async def fetch_message(self, request: Request) -> Response:
        if (denied := self._authenticate(request)) is not None:
            return denied
        message = self.store.get(request.path_params["sid"])
        if message is None or message.account_sid != request.path_params["account_sid"]:
            return twilio_error(20404, path=request.url.path)
        return JSONResponse(message.to_twilio_json())

    async def list_messages(self, request: Request) -> Response:
        if (denied := self._authenticate(request)) is not None:
            return denied
        account_sid = request.path_params["account_sid"]
        query = request.query_params
        filters = {
            key: query[key]
            for key in ("To", "From", "DateSent", "DateSent>", "DateSent<")
            if key in query
        }
        try:
            dates = DateSentFilter.parse(
                filters.get("DateSent"), filters.get("DateSent>"), filters.get("DateSent<")
            )
            page_size = min(int(query.get("PageSize", DEFAULT_PAGE_SIZE)), MAX_PAGE_SIZE)
            page = int(query.get("Page", 0))
        except ValueError:
            return twilio_error(20001, name="DateSent, PageSize or Page")
        if page_size < 1 or page < 0:
            return twilio_error(20001, name="PageSize or Page")
        token = query.get("PageToken")
        after_sid = token[2:] if token and token.startswith("PA") else None
        messages, more = self.store.page(
            account_sid,
            to=filters.get("To"),
            from_=filters.get("From"),
            dates=dates,
            page_size=page_size,
            after_sid=after_sid,
        )
        base = f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"

        def page_uri(number: int, page_token: str | None = None) -> str:
            params = {**filters, "PageSize": page_size, "Page": number}
            if page_token:
                params["PageToken"] = page_token
            return f"{base}?{urlencode(params)}"

        start = page * page_size
        body = {
            "first_page_uri": page_uri(0),
            "end": start + max(len(messages) - 1, 0),
            "previous_page_uri": None,
            "messages": [message.to_twilio_json() for message in messages],
            "uri": page_uri(page, token),
            "page_size": page_size,
            "start": start,
            "next_page_uri": page_uri(page + 1, "PA" + messages[-1].sid) if more else None,
            "page": page,
        }
        return JSONResponse(body)

    # --- /_sandbox/ controls ---------------------------------------------------------

    async def sandbox_messages(self, request: Request) -> Response:
        to = request.query_params.get("to")
        messages = [m.to_sandbox_json() for m in self.store.all() if to is None or m.to == to]
        return JSONResponse({"messages": messages})

    async def sandbox_stats(self, request: Request) -> Response:
        return JSONResponse(self.stats.to_json())

    async def sandbox_reset(self, request: Request) -> Response:
        await self.callbacks.cancel_pending()
        self.store.clear()
        self.stats.clear()
        self.faults = FaultPlan()
        return Response(status_code=204)

    async def get_faults(self, request: Request) -> Response:
        return JSONResponse(self.faults.config.to_json())

    async def set_faults(self, request: Request) -> Response:
        try:
            config = FaultConfig.from_json(json.loads(await request.body()))
        except json.JSONDecodeError:
            return PlainTextResponse("fault config is not valid JSON", status_code=400)
        except FaultConfigError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        self.faults = FaultPlan(config)
        return JSONResponse(config.to_json())

    async def post_callback(self, request: Request) -> Response:
        message = self.store.get(request.path_params["sid"])
        if message is None:
            return PlainTextResponse("no such message", status_code=404)
        if not message.status_callback:
            return PlainTextResponse("message has no StatusCallback", status_code=409)
        try:
            data = json.loads(await request.body())
            status, error_code = data["status"], data.get("error_code")
        except (json.JSONDecodeError, KeyError, TypeError):
            return PlainTextResponse('expected {"status": "...", "error_code": 123?}', 400)
        if status not in CALLBACK_STATUSES or not isinstance(error_code, int | None):
            return PlainTextResponse(f"status must be one of: {', '.join(CALLBACK_STATUSES)}", 400)
        callback_status = await self.callbacks.post(message, status, error_code)
        return JSONResponse(
            {"sid": message.sid, "status": status, "callback_status": callback_status}
        )


async def _hold_until_disconnect(request: Request, timeout_s: float) -> None:
    """Delay the answer until the caller gives up (disconnects) or `timeout_s` passes."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while (await request.receive())["type"] != "http.disconnect":
                pass


def create_app(accounts: Mapping[str, str]) -> Starlette:
    """The sandbox app for `accounts` (account SID -> auth token); state at `app.state.sandbox`."""
    sandbox = Sandbox(accounts)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await sandbox.callbacks.close()

    messages = f"/{API_VERSION}/Accounts/{{account_sid}}/Messages"
    routes = [
        Route(f"{messages}.json", sandbox.create_message, methods=["POST"]),
        Route(f"{messages}.json", sandbox.list_messages, methods=["GET"]),
        Route(f"{messages}/{{sid}}.json", sandbox.fetch_message, methods=["GET"]),
        Route("/_sandbox/messages", sandbox.sandbox_messages, methods=["GET"]),
        Route("/_sandbox/messages/{sid}/callback", sandbox.post_callback, methods=["POST"]),
        Route("/_sandbox/stats", sandbox.sandbox_stats, methods=["GET"]),
        Route("/_sandbox/reset", sandbox.sandbox_reset, methods=["POST"]),
        Route("/_sandbox/faults", sandbox.get_faults, methods=["GET"]),
        Route("/_sandbox/faults", sandbox.set_faults, methods=["POST"]),
        # Up once it answers: how `tools.stack` waits for any HTTP server it starts.
        Route("/readyz", lambda _request: Response("ready"), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.sandbox = sandbox
    return app
