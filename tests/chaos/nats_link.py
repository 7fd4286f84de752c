"""A TCP relay between one service and NATS that the fault suite can cut.

Cutting resets every open connection at once (RST, as a dropped NAT entry or a partition healed
by a reset would) and refuses new ones for a while; then the link works again. Nothing else
changes, so what brings the service back is its own reconnect logic. The relay only copies
bytes, so the service talks to the real server through it, protocol and JetStream included.

Why a relay: nats-server has no portable way to drop one client's connection (there is no
"kick" in its HTTP monitoring API, and the system-account request needs an accounts setup),
while a relay is deterministic and works with every server version.
"""

from __future__ import annotations

import asyncio
import contextlib

_CONNECT_TIMEOUT_S = 2.0
_CHUNK = 64 * 1024


class NatsLink:
    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._port = 0
        self._refusing = False
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections_cut = 0

    @property
    def url(self) -> str:
        assert self._port, "start() first"
        return f"nats://127.0.0.1:{self._port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def cut(self, for_s: float) -> int:
        """Reset every connection and refuse new ones for `for_s`; how many were reset."""
        self._refusing = True
        reset = self._reset_all()
        self.connections_cut += reset
        try:
            await asyncio.sleep(for_s)  # the outage itself, not a wait for some condition
        finally:
            self._refusing = False
        return reset

    def _reset_all(self) -> int:
        pairs = list(self._pairs)
        self._pairs.clear()
        for client, upstream in pairs:
            client.transport.abort()
            upstream.transport.abort()
        return len(pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self._upstream_port), _CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            writer.transport.abort()  # NATS itself is down: the client sees what it would see
            return
        if self._refusing:  # cut while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            self._pairs.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(_CHUNK):
                sink.write(data)
                await sink.drain()
