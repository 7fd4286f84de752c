"""The gateway's HTTP entrypoint: Twilio's webhooks in, contract messages onto JetStream.

Every webhook is answered only after JetStream acknowledged it (200 with empty TwiML), or
with a status Twilio understands as "try again" (503) — never 200 for a message that was not
handed over. Order of checks: size (413) and a body read within the timeout (408), content
type (415), signature (403, or 429 once the source has failed too often: the per-source block
only ever answers requests that fail the signature, so no traffic from others can make a
correctly signed webhook fail), repeated or malformed parameters (400), sender flood (200 and
dropped, so Twilio does not retry spam), publish (200 or 503).

The source of a request is the client address uvicorn reports: the peer, or the address in
X-Forwarded-For when the peer is a trusted proxy (GATEWAY_FORWARDED_ALLOW_IPS).
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.trace import TracerProvider
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from twilio.request_validator import (
    RequestValidator,
    add_port,
    get_signature_algorithm,
    remove_port,
)

from infra.log import get_logger, mask_phone
from infra.streams import INBOUND_MESSAGE_SUBJECT, INBOUND_STATUS_SUBJECT
from services.gateway import domain, metrics
from services.gateway.body_reading import BodyReader, BodyTimeoutError, BodyTooLargeError
from services.gateway.config import Config

_log = get_logger(__name__)

TWIML_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response/>'
FORM_TYPE = "application/x-www-form-urlencoded"

Publish = Callable[[str, bytes, str], Awaitable[None]]
Ready = Callable[[], Awaitable[bool]]


class PublishError(Exception):
    """JetStream did not acknowledge in time; the webhook must not be answered 200."""


class Answer(NamedTuple):
    """A complete HTTP answer, headers encoded once."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @classmethod
    def of(cls, status: int, body: bytes, content_type: bytes) -> Answer:
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        return cls(status, headers, body)

    @classmethod
    def text(cls, status: int, message: str) -> Answer:
        return cls.of(status, message.encode() + b"\n", b"text/plain; charset=utf-8")

    async def send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


TWIML = Answer.of(200, TWIML_EMPTY, b"text/xml")
TOO_LARGE = Answer.text(413, "request body too large")
NOT_FORM = Answer.text(415, f"expected {FORM_TYPE}")
SOURCE_BLOCKED = Answer.text(429, "too many invalid signatures")
MALFORMED = Answer.text(400, "body is not valid form data")
# Sent before the body was read to its end: the connection cannot carry another request.
BODY_TIMEOUT = Answer(
    408,
    [*Answer.text(408, "request body not received in time").headers, (b"connection", b"close")],
    b"request body not received in time\n",
)
BAD_SIGNATURE = Answer.text(403, "invalid Twilio signature")
UNAVAILABLE = Answer.text(503, "message bus unavailable, retry later")


class Headers(NamedTuple):
    """The request headers a webhook reads, picked out of the ASGI scope in one pass."""

    content_type: str
    content_length: str | None
    signature: str | None
    signature_settings: str | None
    idempotency_token: str

    @classmethod
    def of(cls, scope: Scope) -> Headers:
        found: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in _WANTED_HEADERS:
                found[name] = value.decode("latin-1")
        return cls(
            found.get(b"content-type", ""),
            found.get(b"content-length"),
            found.get(b"x-twilio-signature"),
            found.get(b"x-twilio-webhooks-signature-settings"),
            found.get(b"i-twilio-idempotency-token", ""),
        )


_WANTED_HEADERS = frozenset(
    (
        b"content-type",
        b"content-length",
        b"x-twilio-signature",
        b"x-twilio-webhooks-signature-settings",
        b"i-twilio-idempotency-token",
    )
)


class Webhooks:
    """The two webhook endpoints, sharing validation, limits and publishing.

    Each endpoint is a plain ASGI app (reached before Starlette's router when tracing is off,
    see `_WebhooksFirst`): a webhook is the hot path, and it needs neither a `Request` nor a
    `Response` object, only the body, four headers and a precomputed answer."""

    def __init__(self, config: Config, publish: Publish, clock: Callable[[], float]) -> None:
        self._config = config
        self._publish = publish
        self._validators = {sid: RequestValidator(t) for sid, t in config.auth_tokens.items()}
        self._default = (
            RequestValidator(config.default_auth_token) if config.default_auth_token else None
        )
        self._bodies = BodyReader(config.body_read_timeout_s)
        self._base_url = config.public_base_url
        self._base_url_port_variant = _port_variant(config.public_base_url)
        # One counter per endpoint: junk on one never blocks the other.
        window_s = config.signature_failure_window_s
        self._limits = {
            "messages": _EndpointLimits(
                config.max_body_bytes,
                domain.WindowCounter(config.signature_failures_per_window, window_s, clock),
            ),
            "status": _EndpointLimits(
                config.status_max_body_bytes,
                domain.WindowCounter(config.status_signature_failures_per_window, window_s, clock),
            ),
        }
        self._senders = domain.WindowCounter(config.sender_messages_per_minute, 60.0, clock)

    def endpoint(self, name: str) -> ASGIApp:
        return _Endpoint(self, name)

    async def process(self, scope: Scope, receive: Receive, endpoint: str) -> tuple[str, Answer]:
        headers = Headers.of(scope)
        limits = self._limits[endpoint]
        try:
            body = await self._bodies.read(receive, headers.content_length, limits.max_body_bytes)
        except BodyTooLargeError:
            return "too_large", TOO_LARGE
        except BodyTimeoutError:
            return "body_timeout", BODY_TIMEOUT
        if headers.content_type.split(";")[0].strip().lower() != FORM_TYPE:
            return "unsupported_media_type", NOT_FORM
        try:
            params = domain.parse_form(body.decode("utf-8"))
        except UnicodeDecodeError:
            return "malformed", MALFORMED
        if not self._signature_valid(scope, headers, params):
            client = scope.get("client")
            client_ip = client[0] if client else "unknown"
            if limits.bad_signatures.hit(client_ip):
                return "source_blocked", SOURCE_BLOCKED
            # The usual cause is a PUBLIC_BASE_URL other than the URL Twilio was given: say
            # which URL the signature was checked against (path only: no query values).
            _log.warning(
                "webhook.signature_invalid",
                extra={
                    "fields": {
                        "endpoint": endpoint,
                        "client_ip": client_ip,
                        "checked_url": self._base_url + scope["path"],
                        "hint": "signed for another URL? PUBLIC_BASE_URL must be what Twilio calls",
                    }
                },
            )
            return "bad_signature", BAD_SIGNATURE
        received_at = time.time_ns()
        try:
            domain.check_signed_form(params)
            if endpoint == "messages":
                message = domain.message_received(params, received_at)
                if headers.idempotency_token:
                    message.idempotency_token = headers.idempotency_token
                subject, msg_id = INBOUND_MESSAGE_SUBJECT, message.message_sid
            else:
                status = domain.status_received(params, received_at)
                subject = INBOUND_STATUS_SUBJECT
                msg_id = f"{status.message_sid}:{status.message_status}"
        except domain.ParameterError as error:
            # Signed, so not noise: say why nothing was published (phone numbers masked).
            _log.warning(
                "webhook.refused",
                extra={
                    "fields": {
                        "endpoint": endpoint,
                        "message_sid": params.get("MessageSid", ""),
                        "from": mask_phone(params.get("From", "")),
                        "error": str(error),
                    }
                },
            )
            return "bad_request", Answer.text(400, str(error))
        span = trace.get_current_span()
        if span.is_recording():  # ops find a message's trace by the MessageSid Twilio shows
            span.set_attribute("twilio.message_sid", params.get("MessageSid", ""))
        if endpoint == "messages" and self._senders.hit(params["From"]):
            _log.warning(
                "webhook.sender_flood_dropped",
                extra={"fields": {"message_sid": msg_id, "sender": params["From"]}},
            )
            return "sender_flood_dropped", TWIML
        payload = (message if endpoint == "messages" else status).SerializeToString()
        try:
            await self._publish(subject, payload, msg_id)
        except PublishError as error:
            _log.warning(
                "webhook.publish_failed",
                extra={"fields": {"message_sid": msg_id, "error": str(error)}},
            )
            return "unavailable", UNAVAILABLE
        return "accepted", TWIML

    def _signature_valid(self, scope: Scope, headers: Headers, params: domain.FormParams) -> bool:
        signature = headers.signature
        if not signature:
            return False
        validator = self._validators.get(params.get("AccountSid", ""), self._default)
        if validator is None:
            return False
        target = scope["path"]
        if query := scope["query_string"]:
            target += "?" + query.decode("latin-1")
        algorithm = get_signature_algorithm(headers.signature_settings)
        try:
            expected = validator.compute_signature(self._base_url + target, params, algorithm)
            if hmac.compare_digest(expected.encode(), signature.encode()):
                return True
            # Twilio signs some URLs with the default port and some without; the SDK's
            # validate() accepts both. Tried only when the configured form did not match.
            if self._base_url_port_variant is None:
                return False
            expected = validator.compute_signature(
                self._base_url_port_variant + target, params, algorithm
            )
        except ValueError:  # an algorithm this SDK does not know
            return False
        return hmac.compare_digest(expected.encode(), signature.encode())


class _EndpointLimits(NamedTuple):
    max_body_bytes: int
    bad_signatures: domain.WindowCounter


def _port_variant(base_url: str) -> str | None:
    """The base URL with the scheme's default port added, or removed if it is there (the
    twilio SDK's own `add_port`/`remove_port`); None when there is no other form."""
    parsed = urlparse(base_url)
    variant = remove_port(parsed) if parsed.port else add_port(parsed)
    return variant if variant != base_url else None


class _Endpoint:
    """One webhook route as an ASGI app (an instance, so Starlette does not wrap it in a
    request/response function)."""

    def __init__(self, webhooks: Webhooks, name: str) -> None:
        self._webhooks = webhooks
        self._name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        outcome, answer = await self._webhooks.process(scope, receive, self._name)
        await answer.send(send)
        metrics.observe_webhook(self._name, outcome, time.perf_counter() - started)


def create_app(
    config: Config,
    publish: Publish,
    ready: Ready,
    *,
    clock: Callable[[], float] = time.monotonic,
    traced: bool = False,
    tracer_provider: TracerProvider | None = None,
) -> ASGIApp:
    """The gateway's ASGI app: webhooks skip Starlette's router. `traced`: a server span per
    request (probes and scrapes aside), named after its route, joined to the caller's trace;
    spans go to `tracer_provider`, else to the process's."""
    webhooks = Webhooks(config, publish, clock)

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_: Request) -> Response:
        if await ready():
            return PlainTextResponse("ready\n")
        return PlainTextResponse("message bus not ready\n", status_code=503)

    registry = REGISTRY
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # one of several workers: answer for all
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    endpoints = {
        "/webhooks/twilio/messages": webhooks.endpoint("messages"),
        "/webhooks/twilio/status": webhooks.endpoint("status"),
    }
    app = Starlette(
        routes=[
            *(Route(path, endpoint, methods=["POST"]) for path, endpoint in endpoints.items()),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ]
    )
    fast = _WebhooksFirst(app, endpoints)
    if traced:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        routes = {route.path for route in app.routes if isinstance(route, Route)}

        def span_details(scope: Scope) -> tuple[str, dict[str, str]]:
            # Named after the route, never after a path a caller made up (unbounded names).
            method, path = scope.get("method", "HTTP"), scope.get("path", "")
            if path in routes:
                return f"{method} {path}", {"http.route": path}
            return method, {}

        # One server span per request; none for each body chunk received or sent (ASGI's
        # internal spans), and none for probes and scrapes.
        return OpenTelemetryMiddleware(
            fast,
            excluded_urls="/healthz,/readyz,/metrics",
            default_span_details=span_details,
            exclude_spans=["receive", "send"],
            tracer_provider=tracer_provider,
        )
    return fast


class _WebhooksFirst:
    """A webhook POST goes straight to its endpoint, anything else through Starlette's
    routing: the router's matching and exception layers would cost about a sixth of a
    webhook's own work."""

    def __init__(self, app: Starlette, endpoints: dict[str, ASGIApp]) -> None:
        self._app = app
        self._endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            endpoint = self._endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self._app(scope, receive, send)
