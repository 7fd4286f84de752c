"""NATS as deployed (deploy/base/nats/nats.conf): three JetStream servers in one cluster, with the
deployment's `sync_interval`, the users of infra/nats_users.py, and clients told every server's
URL (`no_advertise`, as deployed); started from the same nats-server binary as the single
embedded server (`EmbeddedNats`), each on its own store, kept across restarts.

Each server reaches the other two only through one `NatsLink` per direction (six relays), so a
running server can be partitioned from the other two: cutting its four links resets its routes
and refuses new ones for a while. The relays run on their own thread and event loop, so the
load the test drives in its own loop never delays the cluster's Raft traffic.

Who leads a stream is asked through the JetStream API (`$JS.API.STREAM.INFO.<stream>`, the
`cluster.leader` of its answer), of one chosen server: one that is neither down nor cut off.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import secrets
import threading
import time
from collections.abc import Collection, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.js.api import StreamInfo

from tests.chaos.nats_link import NatsLink
from tests.support.processes import ROOT
from tools.devstack import EmbeddedNats, free_port, nats_service_env

T = TypeVar("T")

SIZE = 3
CLUSTER_NAME = "snapsell-nats"
DEPLOYED_CONFIG = ROOT / "deploy" / "base" / "nats" / "nats.conf"
QUERY_TIMEOUT_S = 1.0
_POLL_S = 0.1


def deployed_sync_interval() -> str:
    """The `sync_interval` of the deployed servers' `jetstream` block."""
    found = re.search(r"^\s*sync_interval:\s*(\S+)", DEPLOYED_CONFIG.read_text(), re.MULTILINE)
    if found is None:
        raise AssertionError(f"no sync_interval in {DEPLOYED_CONFIG}")
    return found.group(1)


def _member_config(name: str, cluster_port: int, routes: Collection[str]) -> str:
    lines = [
        f"server_name: {name}",
        f"jetstream {{ sync_interval: {deployed_sync_interval()} }}",
        "cluster {",
        f"  name: {CLUSTER_NAME}",
        f"  listen: 127.0.0.1:{cluster_port}",
        "  no_advertise: true",
        "  routes: [",
        *(f"    {route}" for route in routes),
        "  ]",
        "}",
    ]
    return "\n".join(lines) + "\n"


async def _ignore(_: Exception) -> None:
    pass


class _RelayLoop:
    """An event loop on a thread of its own, for the route relays."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats-routes")

    def start(self) -> None:
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()


class NatsCluster:
    def __init__(self, base_dir: Path) -> None:
        self.names = [f"nats-{index}" for index in range(SIZE)]
        self._base_dir = base_dir
        self._relays = _RelayLoop()
        self._links: dict[tuple[int, int], NatsLink] = {}  # (from, to) -> relay
        self.nodes: list[EmbeddedNats] = []

    @property
    def url(self) -> str:
        """Every server's admin URL, separated by commas."""
        return ",".join(node.url for node in self.nodes)

    def service_env(self, service: str) -> dict[str, str]:
        """`NATS_URL` (every server), `NATS_USER` and `NATS_PASSWORD` for a service."""
        envs = [nats_service_env(node.url, service) for node in self.nodes]
        return envs[0] | {"NATS_URL": ",".join(env["NATS_URL"] for env in envs)}

    async def start(self) -> None:
        """Start the relays, then the three servers at once (none is healthy alone)."""
        self._relays.start()
        cluster_ports = [free_port() for _ in self.names]
        for source, target in itertools.permutations(range(SIZE), 2):
            link = NatsLink(cluster_ports[target])
            await self._relays.run(link.start())
            self._links[(source, target)] = link
        admin_password = secrets.token_hex(24)
        for index, name in enumerate(self.names):
            store_dir = self._base_dir / name
            store_dir.mkdir(parents=True)
            # One admin password for all three, so every service user has one password.
            fd = os.open(store_dir / "admin.password", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(admin_password)
            routes = [self._links[(index, other)].url for other in self._others(index)]
            config = _member_config(name, cluster_ports[index], routes)
            self.nodes.append(EmbeddedNats(store_dir, extra_config=config))
        await self.restart(*range(SIZE))

    async def stop(self) -> None:
        try:
            await asyncio.gather(*(asyncio.to_thread(node.stop) for node in self.nodes))
        finally:
            for link in self._links.values():
                await self._relays.run(link.close())
            self._relays.stop()

    async def kill(self, index: int) -> int | None:
        """SIGKILL one server; the pid it had."""
        pid = self.nodes[index].pid
        await asyncio.to_thread(self.nodes[index].kill)
        return pid

    async def restart(self, *indices: int) -> None:
        """Start these servers on their stores and wait until each reports JetStream healthy
        (caught up with the cluster)."""
        await asyncio.gather(*(asyncio.to_thread(self.nodes[index].start) for index in indices))

    async def partition(self, index: int, for_s: float) -> int:
        """Cut every route of one server for `for_s` (it keeps running and keeps its clients);
        how many route connections were reset."""
        links = [
            self._links[pair]
            for other in self._others(index)
            for pair in ((index, other), (other, index))
        ]

        async def cut_all() -> list[int]:
            return await asyncio.gather(*(link.cut(for_s) for link in links))

        return sum(await self._relays.run(cut_all()))

    async def stream_info(self, stream: str, via: int) -> StreamInfo | None:
        """The stream as server `via` answers for it; None if it does not answer in time."""
        try:
            client = await nats.connect(
                self.nodes[via].url,
                name="chaos-cluster-probe",
                connect_timeout=QUERY_TIMEOUT_S,
                allow_reconnect=False,
                error_cb=_ignore,  # it fails while the server is down: None says so
            )
        except (OSError, TimeoutError, nats.errors.Error):
            return None
        try:
            return await client.jetstream(timeout=QUERY_TIMEOUT_S).stream_info(stream)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
            return None
        finally:
            await client.close()

    async def leader(
        self, stream: str, *, via: int, not_on: Collection[int] = (), timeout_s: float = 60.0
    ) -> int | None:
        """The server leading `stream` once one not in `not_on` does, as `via` sees it; None
        if none does within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.stream_info(stream, via)
            leader = info.cluster.leader if info is not None and info.cluster else None
            if leader in self.names and self.names.index(leader) not in not_on:
                return self.names.index(leader)
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(_POLL_S)

    async def wait_in_sync(self, stream: str, *, timeout_s: float = 60.0) -> int:
        """Until `stream` has a leader and both other replicas are current; the leader."""
        deadline = time.monotonic() + timeout_s
        while True:
            leader = await self.leader(stream, via=0, timeout_s=0)
            info = None if leader is None else await self.stream_info(stream, leader)
            replicas = (info.cluster.replicas if info is not None and info.cluster else None) or []
            if len(replicas) == SIZE - 1 and all(peer.current for peer in replicas):
                assert leader is not None
                return leader
            if time.monotonic() > deadline:
                raise AssertionError(f"{stream} not in sync after {timeout_s}s: {info}")
            await asyncio.sleep(_POLL_S)

    def running(self, *, excluding: Collection[int]) -> int:
        """A running server outside `not_of`."""
        return next(i for i in range(SIZE) if i not in excluding and self.nodes[i].pid is not None)

    @staticmethod
    def _others(index: int) -> list[int]:
        return [other for other in range(SIZE) if other != index]
