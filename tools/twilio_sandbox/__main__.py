"""Run the Twilio sandbox: `python -m tools.twilio_sandbox --port 8089`.

Accounts come from `--accounts AC...=token,AC...=token`, else from TWILIO_ACCOUNT_SID +
TWILIO_AUTH_TOKEN (and the extra pairs in TWILIO_AUTH_TOKENS). `--port 0` picks a free port;
the one line printed on stdout once the socket accepts connections tells which.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Mapping

import uvicorn
import uvloop

from tools.twilio_sandbox.app import create_app


class _Server(uvicorn.Server):
    # uvicorn re-raises the caught signal after shutting down, which ends the process with
    # a traceback (SIGINT) or a signal status; the sandbox handles signals itself and exits 0.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def parse_accounts(spec: str) -> dict[str, str]:
    """`AC1=token1,AC2=token2` -> {"AC1": "token1", "AC2": "token2"}."""
    accounts: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in spec.split(","))):
        sid, sep, token = pair.partition("=")
        if not sep or not sid.startswith("AC") or not token:
            raise ValueError(f"account {sid or pair!r} is not of the form AC...=token")
        accounts[sid] = token
    return accounts


def accounts_from_env(env: Mapping[str, str]) -> dict[str, str]:
    accounts = parse_accounts(env.get("TWILIO_AUTH_TOKENS", ""))
    sid, token = env.get("TWILIO_ACCOUNT_SID"), env.get("TWILIO_AUTH_TOKEN")
    if sid and token:
        accounts[sid] = token
    return accounts


async def serve(host: str, port: int, accounts: Mapping[str, str]) -> None:
    config = uvicorn.Config(
        create_app(accounts),
        host=host,
        port=port,
        http="httptools",
        loop="none",
        access_log=False,
        proxy_headers=False,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, setattr, server, "should_exit", True)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving
            raise SystemExit(1)
        await asyncio.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    print(f"twilio sandbox listening on http://{host}:{bound_port}", flush=True)
    await serving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.twilio_sandbox")
    parser.add_argument("--host", default="127.0.0.1")
    default_port = int(os.environ.get("TWILIO_SANDBOX_PORT", "8089"))
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--accounts", help="AC...=token,AC...=token (default: TWILIO_* env)")
    args = parser.parse_args(argv)
    try:
        accounts = parse_accounts(args.accounts) if args.accounts else accounts_from_env(os.environ)
    except ValueError as exc:
        print(f"twilio sandbox: {exc}", file=sys.stderr)
        return 2
    if not accounts:
        print(
            "twilio sandbox: no account; pass --accounts or set TWILIO_ACCOUNT_SID and "
            "TWILIO_AUTH_TOKEN",
            file=sys.stderr,
        )
        return 2
    uvloop.run(serve(args.host, args.port, accounts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
