"""Channels for calling other SnapSell services over gRPC.

Every channel retries calls that fail with UNAVAILABLE (the peer restarting or not up yet; the
request was not processed), keeps connections alive, sends a `service`-role bearer token and,
when tracing is on, the caller's trace context. The token names the peer as its audience:
a token for one service is refused by every other. Unary calls get `DEFAULT_DEADLINE_S` unless the
caller passes its own `timeout`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from infra.auth import ServiceTokenProvider, TokenProvider
from infra.log import service_name
from infra.telemetry import grpc_client_interceptors

DEFAULT_DEADLINE_S = 5.0

RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],  # every method of every service on this channel
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", RETRY_SERVICE_CONFIG),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a peer restart, so retries find it within their ~3 s budget.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
)


class _CallAuth(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call and a default deadline to unary-response calls."""

    def __init__(self, token_provider: TokenProvider, default_timeout_s: float | None) -> None:
        self._tokens = token_provider
        self._default_timeout_s = default_timeout_s

    def _details(
        self, details: grpc.aio.ClientCallDetails, unary_response: bool
    ) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if "authorization" not in metadata:  # a caller may forward an end user's own token
            metadata["authorization"] = f"Bearer {self._tokens.token()}"
        timeout = details.timeout
        if timeout is None and unary_response:
            timeout = self._default_timeout_s
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details, True), request)

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details, False), request)

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(self._details(details, True), requests)

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(self._details(details, False), requests)


def service_channel(
    addr: str,
    *,
    audience: str | None = None,
    token_provider: TokenProvider | None = None,
    default_timeout_s: float | None = DEFAULT_DEADLINE_S,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An insecure (in-cluster) channel to `addr` ("host:port").

    Without `token_provider`, this process's service (see `infra.log.setup_logging`) signs its
    own tokens for `audience`, the peer's service name, with the key in
    `SNAPSELL_SIGNING_KEY_FILE`; ConfigError when it is unset.
    `options` are added to, and override, `CHANNEL_OPTIONS`.
    """
    if token_provider is None:
        if not audience:
            raise ValueError("service_channel needs the peer's service name as audience")
        token_provider = ServiceTokenProvider.from_env(service_name(), audience)
    provider = token_provider
    merged = dict(CHANNEL_OPTIONS) | dict(options)
    interceptors: list[grpc.aio.ClientInterceptor] = [
        *grpc_client_interceptors(),
        _CallAuth(provider, default_timeout_s),
    ]
    return grpc.aio.insecure_channel(addr, options=list(merged.items()), interceptors=interceptors)
