"""The command line of every service: what each `services/<name>/__main__.py` runs.

    python -m services.<name> [serve]   # serve until SIGTERM (the default command)
    python -m services.<name> migrate   # provision role + schema, apply migrations, exit

    def main(argv: list[str]) -> None:
        run_service(SERVICE, argv, serve=serve, migrations=MIGRATIONS)

A service without a database (the gateway) passes no `migrations` and has no `migrate`. Any
other command prints the usage line and exits 2. `before_serve`, run before the event loop
starts, may take the process over (the gateway's supervisor of several processes) by
returning an exit code; None goes on to `serve`. Exit codes and signals: `infra.lifecycle`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from infra.config import ConfigError
from infra.lifecycle import exit_configuration_error, run_main
from infra.log import get_logger

_log = get_logger(__name__)

Serve = Callable[[asyncio.Event], Awaitable[None]]


def usage(service: str, *, migrate: bool) -> str:
    commands = "serve|migrate" if migrate else "serve"
    return f"usage: python -m services.{service} [{commands}]"


def run_service(
    service: str,
    argv: Sequence[str],
    *,
    serve: Serve,
    migrations: Path | None = None,
    before_serve: Callable[[], int | None] | None = None,
) -> None:
    command = list(argv) or ["serve"]
    if command == ["migrate"] and migrations is not None:
        # Imported here: a service without a database (the gateway) need not load asyncpg.
        from infra.db import migrate_service

        async def migrate(_stop: asyncio.Event) -> None:
            await migrate_service(service, migrations)
            _log.info(f"{service}.migrated")

        run_main(migrate, service=service)
    elif command == ["serve"]:
        if before_serve is not None:
            try:
                code = before_serve()
            except ConfigError as error:
                exit_configuration_error(service, error)
            if code is not None:
                sys.exit(code)
        run_main(serve, service=service, database=migrations is not None)
    else:
        print(usage(service, migrate=migrations is not None), file=sys.stderr)
        sys.exit(2)
