"""Composition root of the gateway: `python -m services.gateway [serve]`.

With `GATEWAY_WORKERS` > 1 this process only supervises that many gateway processes
(`processes.py`); it decides so before importing the app (`server.py`: uvicorn, NATS, protobuf,
tracing), which only the processes that serve load.
"""

from __future__ import annotations

import sys

from services.gateway.processes import supervise_when_configured

# nats-py imports aiohttp when it can, for websocket URLs only (`ws://`), which NATS_URL does
# not accept (config.py): aiohttp and its dependencies would be ~14 MB resident per process.
WITHOUT_MODULES = ("aiohttp",)


def load_server() -> None:
    """Import the app as a serving process does, without `WITHOUT_MODULES` (a module set to
    None in `sys.modules` raises ImportError when imported, and nats-py does without)."""
    for name in WITHOUT_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    from services.gateway import server  # noqa: F401


def main(argv: list[str]) -> None:
    supervise_when_configured(argv)
    load_server()  # the supervisor never loads the app
    from services.gateway import server

    server.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
