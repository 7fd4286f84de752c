"""Composition root of the gateway: `python -m services.gateway [serve]`.

With `GATEWAY_WORKERS` > 1 this process only supervises that many gateway processes
(`processes.py`); it decides so before importing the app (`server.py`: uvicorn, NATS, protobuf,
tracing), which only the processes that serve load.
"""

from __future__ import annotations

import sys

from services.gateway.processes import supervise_when_configured


def main(argv: list[str]) -> None:
    supervise_when_configured(argv)
    from services.gateway import server  # the supervisor never loads the app

    server.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
