"""A gateway process configured with the test Twilio accounts."""

from __future__ import annotations

from tests.support.processes import start_service
from tests.support.twilio import ACCOUNT_SID, AUTH_TOKEN, OTHER_ACCOUNT_SID, OTHER_AUTH_TOKEN
from tools.stack import RunningService, spawn_service

PUBLIC_BASE_URL = "https://hooks.example.com/snapsell"


def gateway_env(nats_url: str, **env: str) -> dict[str, str]:
    return {
        "NATS_URL": nats_url,
        "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_AUTH_TOKENS": f"{OTHER_ACCOUNT_SID}={OTHER_AUTH_TOKEN}",
        "GATEWAY_SIGNATURE_FAILURES_LIMIT": "25",
        "GATEWAY_SENDER_MESSAGES_PER_MINUTE": "5",
        "GATEWAY_PUBLISH_TIMEOUT_SECONDS": "1",
        **env,
    }


async def start_gateway(nats_url: str, **env: str) -> RunningService:
    return await start_service("gateway", gateway_env(nats_url, **env), http=True)


def spawn_gateway(nats_url: str, **env: str) -> RunningService:
    """Started without waiting until it is ready (it may never be)."""
    return spawn_service("gateway", gateway_env(nats_url, **env), http=True)
