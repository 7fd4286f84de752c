"""The gateway's HTTP entrypoint: Twilio's webhooks in, contract messages onto JetStream.

Every webhook is answered only after JetStream acknowledged it (200 with empty TwiML), or
with a status Twilio understands as "try again" (503) — never 200 for a message that was not
handed over. Order of checks, cheapest first: size (413), content type (415), source blocked
for bad signatures (429), signature (403), required parameters (400), sender flood (200 and
dropped, so Twilio does not retry spam), publish (200 or 503).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator, get_signature_algorithm

from infra.log import get_logger
from infra.streams import INBOUND_MESSAGE_SUBJECT, INBOUND_STATUS_SUBJECT
from services.gateway import domain, metrics
from services.gateway.config import Config

log = get_logger(__name__)

TWIML_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response/>'
FORM_TYPE = "application/x-www-form-urlencoded"

Publish = Callable[[str, bytes, str], Awaitable[None]]
Ready = Callable[[], Awaitable[bool]]


class PublishError(Exception):
    """JetStream did not acknowledge in time; the webhook must not be answered 200."""


class BodyTooLargeError(Exception):
    pass


def _text(status: int, message: str) -> Response:
    return PlainTextResponse(message + "\n", status_code=status)


def _twiml() -> Response:
    return Response(TWIML_EMPTY, media_type="text/xml")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError
    if declared is not None:
        body = await request.body()
        if len(body) > limit:
            raise BodyTooLargeError
        return body
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError
        chunks.append(chunk)
    return b"".join(chunks)


class Webhooks:
    """The two webhook endpoints, sharing validation, limits and publishing."""

    def __init__(self, config: Config, publish: Publish, clock: Callable[[], float]) -> None:
        self._config = config
        self._publish = publish
        self._validators = {sid: RequestValidator(t) for sid, t in config.auth_tokens.items()}
        self._default = (
            RequestValidator(config.default_auth_token) if config.default_auth_token else None
        )
        self._bad_signatures = domain.WindowCounter(
            config.signature_failures_per_window, config.signature_failure_window_s, clock
        )
        self._senders = domain.WindowCounter(config.sender_messages_per_minute, 60.0, clock)

    async def messages(self, request: Request) -> Response:
        return await self._handle(request, "messages")

    async def status(self, request: Request) -> Response:
        return await self._handle(request, "status")

    async def _handle(self, request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        outcome, response = await self._process(request, endpoint)
        metrics.observe_webhook(endpoint, outcome, time.perf_counter() - started)
        return response

    async def _process(self, request: Request, endpoint: str) -> tuple[str, Response]:
        client_ip = request.client.host if request.client else "unknown"
        try:
            body = await _read_body(request, self._config.max_body_bytes)
        except BodyTooLargeError:
            return "too_large", _text(413, "request body too large")
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != FORM_TYPE:
            return "unsupported_media_type", _text(415, f"expected {FORM_TYPE}")
        if self._bad_signatures.over_limit(client_ip):
            return "source_blocked", _text(429, "too many invalid signatures")
        try:
            params = domain.parse_form(body.decode("utf-8"))
        except UnicodeDecodeError:
            return "malformed", _text(400, "body is not valid form data")
        if not self._signature_valid(request, params):
            self._bad_signatures.hit(client_ip)
            log.warning(
                "webhook.signature_invalid",
                extra={"fields": {"endpoint": endpoint, "client_ip": client_ip}},
            )
            return "bad_signature", _text(403, "invalid Twilio signature")
        received_at = time.time_ns()
        try:
            if endpoint == "messages":
                message = domain.message_received(params, received_at)
                subject, msg_id = INBOUND_MESSAGE_SUBJECT, message.message_sid
            else:
                status = domain.status_received(params, received_at)
                subject = INBOUND_STATUS_SUBJECT
                msg_id = f"{status.message_sid}:{status.message_status}"
        except domain.MissingParameterError as error:
            return "bad_request", _text(400, str(error))
        span = trace.get_current_span()
        if span.is_recording():  # ops find a message's trace by the MessageSid Twilio shows
            span.set_attribute("twilio.message_sid", params.get("MessageSid", ""))
        if endpoint == "messages" and self._senders.hit(params["From"]):
            log.warning(
                "webhook.sender_flood_dropped",
                extra={"fields": {"message_sid": msg_id, "sender": params["From"]}},
            )
            return "sender_flood_dropped", _twiml()
        payload = (message if endpoint == "messages" else status).SerializeToString()
        try:
            await self._publish(subject, payload, msg_id)
        except PublishError as error:
            log.warning(
                "webhook.publish_failed",
                extra={"fields": {"message_sid": msg_id, "error": str(error)}},
            )
            return "unavailable", _text(503, "message bus unavailable, retry later")
        return "accepted", _twiml()

    def _signature_valid(self, request: Request, params: domain.FormParams) -> bool:
        signature = request.headers.get("x-twilio-signature")
        if not signature:
            return False
        validator = self._validators.get(params.get("AccountSid", ""), self._default)
        if validator is None:
            return False
        url = self._config.public_base_url + request.scope["path"]
        if query := request.scope["query_string"]:
            url += "?" + query.decode("latin-1")
        algorithm = get_signature_algorithm(
            request.headers.get("x-twilio-webhooks-signature-settings")
        )
        try:
            expected = validator.compute_signature(url, params, algorithm)
        except ValueError:  # an algorithm this SDK does not know
            return False
        return hmac.compare_digest(expected.encode(), signature.encode())


def create_app(
    config: Config,
    publish: Publish,
    ready: Ready,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Starlette:
    webhooks = Webhooks(config, publish, clock)

    async def healthz(_: Request) -> Response:
        return _text(200, "ok")

    async def readyz(_: Request) -> Response:
        if await ready():
            return _text(200, "ready")
        return _text(503, "message bus not ready")

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/webhooks/twilio/messages", webhooks.messages, methods=["POST"]),
            Route("/webhooks/twilio/status", webhooks.status, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ]
    )
