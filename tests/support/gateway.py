"""A gateway process configured with the test Twilio accounts."""

from __future__ import annotations

from tests.support.processes import start_service
from tests.support.twilio import ACCOUNT_SID, AUTH_TOKEN, OTHER_ACCOUNT_SID, OTHER_AUTH_TOKEN
from tools.stack import RunningService

PUBLIC_BASE_URL = "https://hooks.example.com/snapsell"


async def start_gateway(nats_url: str, **env: str) -> RunningService:
    return await start_service(
        "gateway",
        {
            "NATS_URL": nats_url,
            "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_AUTH_TOKENS": f"{OTHER_ACCOUNT_SID}={OTHER_AUTH_TOKEN}",
            "GATEWAY_SIGNATURE_FAILURES_LIMIT": "25",
            "GATEWAY_SENDER_MESSAGES_PER_MINUTE": "5",
            "GATEWAY_PUBLISH_TIMEOUT_SECONDS": "1",
            **env,
        },
        http=True,
    )
