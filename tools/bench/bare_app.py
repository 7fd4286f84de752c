"""The baseline the gateway is compared to: a bare Starlette route on the same server settings.

    HTTP_PORT=8081 python -m tools.bench.bare_app

`POST /webhooks/twilio/messages` reads the whole body and answers the same empty TwiML as the
gateway (`text/xml`), doing nothing else: no parsing, no signature check, no publish. It is the
ceiling of "Starlette on uvicorn" on this machine, so `gateway_rps / bare_rps` shows what the
gateway's own work costs. `GET /readyz` answers 200 so both servers are started the same way.

Server settings (`UVICORN_SETTINGS`) match `services/gateway/server.py`: uvloop, httptools,
access log and lifespan off, proxy headers trusted from 127.0.0.1, uvicorn's default backlog
(2048) and keep-alive; `BARE_WORKERS=N` (default 1) runs N processes on the port, as
`GATEWAY_WORKERS=N` does for the gateway. If the gateway's settings change, change them here
too, or the ratio compares two different servers.
"""

from __future__ import annotations

import os
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
UVICORN_SETTINGS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "access_log": False,
    "lifespan": "off",
    "proxy_headers": True,
    "forwarded_allow_ips": "127.0.0.1",
    "backlog": 2048,
    "log_level": "warning",
}


async def inbound_message(request: Request) -> Response:
    await request.body()
    return Response(EMPTY_TWIML, media_type="text/xml")


async def ready(_request: Request) -> Response:
    return PlainTextResponse("ready")


app = Starlette(
    routes=[
        Route("/webhooks/twilio/messages", inbound_message, methods=["POST"]),
        Route("/readyz", ready, methods=["GET"]),
    ]
)


def main() -> None:
    port = int(os.environ.get("HTTP_PORT", "8081"))
    workers = int(os.environ.get("BARE_WORKERS", "1"))
    # An import string: uvicorn starts several workers from one only.
    uvicorn.run(
        "tools.bench.bare_app:app", host="127.0.0.1", port=port, workers=workers, **UVICORN_SETTINGS
    )


if __name__ == "__main__":
    main()
