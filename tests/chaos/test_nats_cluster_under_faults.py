"""NATS as deployed (issue #24): the whole system on a three-server JetStream cluster (streams
with three replicas, `sync_interval` as deployed; tests/chaos/cluster.py), every service told
all three servers, under the fault suite's steady load of signed webhooks and enqueues.

The faults strike the INBOUND stream, which every webhook goes through before its 200: its
leader is SIGKILLed and another elected; then a follower is SIGKILLed too, which leaves one
server of three (no quorum: no webhook can be stored, the gateway answers 503) until both are
restarted on their stores; then the leader is cut off from the other two (its routes reset and
refused) while it keeps running and keeps its clients, until the routes come back.

Afterwards every webhook answered 200 is processed exactly once (one ledger row, one
`MessageRouted`), every message Twilio accepted is recorded by exactly one outbox message, and
nothing is sent twice; the 503s are counted and printed. `make chaos` runs it with 5,000
webhooks, `make test` with CLUSTER_WEBHOOKS, both at CLUSTER_RATE a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from infra.streams import inbound_stream
from tests.chaos.cluster import NatsCluster
from tests.chaos.faults import FAST_RECOVERY_ENV, OUTAGE_S, Fault
from tests.chaos.load import LoadSize, rate_from_env
from tests.chaos.scenario import Scenario, run_scenario
from tests.support.stack import SERVICES, SystemStack, start_system
from tools.dev_keys import DevKeys
from tools.devstack import EmbeddedPostgres

# About a minute in `make test`: each fault meets load, and the last tenth of it the recovery.
CLUSTER_WEBHOOKS = "600"
# Slower than the single server's pace: every write is fsynced on two servers of three before
# it is acknowledged (`make chaos` sets SNAPSELL_CHAOS_CLUSTER_RATE).
CLUSTER_RATE = "20"
# Longer than an election takes (a follower waits 4 to 9 s without heartbeats before it stands).
PARTITION_S = 12.0
STREAM = inbound_stream().name


@dataclass
class ClusterFaults:
    cluster: NatsCluster
    down: list[int] = field(default_factory=list)

    def plan(self) -> list[Fault]:
        return [
            ("SIGKILL the INBOUND leader", self.kill_leader),
            ("SIGKILL a follower (no quorum), restart both", self.kill_follower_restart_both),
            ("partition the INBOUND leader", self.partition_leader),
        ]

    async def kill_leader(self) -> str:
        cluster = self.cluster
        leader = await cluster.wait_in_sync(STREAM)
        pid = await cluster.kill(leader)
        self.down.append(leader)
        started = time.monotonic()
        elected = await cluster.leader(
            STREAM, via=cluster.running(excluding=self.down), not_on=self.down
        )
        assert elected is not None, "no new leader after the leader was killed"
        return (
            f"{cluster.names[leader]} (pid {pid}) killed; {cluster.names[elected]} elected "
            f"after {time.monotonic() - started:.1f}s"
        )

    async def kill_follower_restart_both(self) -> str:
        cluster = self.cluster
        survivor = cluster.running(excluding=self.down)
        leader = await cluster.leader(STREAM, via=survivor, not_on=self.down)
        assert leader is not None, "no leader before the follower was killed"
        follower = cluster.running(excluding=[*self.down, leader])
        pid = await cluster.kill(follower)
        self.down.append(follower)
        await asyncio.sleep(OUTAGE_S)  # one server of three: the outage itself
        down, self.down = self.down, []
        started = time.monotonic()
        await cluster.restart(*down)
        elected = await cluster.wait_in_sync(STREAM)
        names = " and ".join(cluster.names[index] for index in down)
        return (
            f"{cluster.names[follower]} (pid {pid}) killed, {cluster.names[leader]} alone; "
            f"{names} restarted, in sync under {cluster.names[elected]} "
            f"after {time.monotonic() - started:.1f}s"
        )

    async def partition_leader(self) -> str:
        cluster = self.cluster
        leader = await cluster.wait_in_sync(STREAM)
        cut = asyncio.create_task(cluster.partition(leader, PARTITION_S))
        started = time.monotonic()
        elected = await cluster.leader(
            STREAM,
            via=cluster.running(excluding=[leader]),
            not_on=[leader],
            timeout_s=PARTITION_S,
        )
        election = (
            "none elected while it was cut off"
            if elected is None
            else f"{cluster.names[elected]} elected after {time.monotonic() - started:.1f}s"
        )
        reset = await cut
        healed = time.monotonic()
        await cluster.wait_in_sync(STREAM)
        return (
            f"{cluster.names[leader]} cut off for {PARTITION_S:g}s ({reset} route connections "
            f"reset); {election}; in sync {time.monotonic() - healed:.1f}s after"
        )


@dataclass
class ClusterWorld:
    stack: SystemStack
    postgres: EmbeddedPostgres
    cluster: NatsCluster


@pytest.fixture(scope="module")
async def cluster_world(
    tmp_path_factory: pytest.TempPathFactory, token_keys: DevKeys
) -> AsyncIterator[ClusterWorld]:
    """Its own PostgreSQL: the package's is shared with the fault suite's stack, whose
    services would otherwise work on this one's tables."""
    base: Path = tmp_path_factory.mktemp("nats-cluster")
    async with AsyncExitStack() as stop:
        postgres = EmbeddedPostgres(base / "postgres")
        stop.callback(postgres.destroy)
        postgres.start()
        cluster = NatsCluster(base / "nats")
        stop.push_async_callback(cluster.stop)
        await cluster.start()
        stack = await start_system(
            postgres.dsn,
            cluster.url,
            token_keys,
            base / "system",
            env={"NATS_STREAM_REPLICAS": "3"},
            service_env={
                name: FAST_RECOVERY_ENV.get(name, {}) | cluster.service_env(name)
                for name in SERVICES
            },
            trace=False,
        )
        stop.push_async_callback(stack.stop)
        yield ClusterWorld(stack, postgres, cluster)


async def test_every_webhook_answered_200_is_processed_once_through_nats_cluster_faults(
    cluster_world: ClusterWorld,
) -> None:
    stack, cluster = cluster_world.stack, cluster_world.cluster
    scenario = Scenario(
        title="NATS cluster (3 servers, R3)",
        stack=stack,
        postgres_dsn=cluster_world.postgres.dsn,
        nats_url=cluster.url,
        processes=lambda: list(stack.services.values()),
        plan=ClusterFaults(cluster).plan(),
    )
    size = LoadSize.from_env(CLUSTER_WEBHOOKS)
    await run_scenario(scenario, size, rate_from_env("SNAPSELL_CHAOS_CLUSTER_RATE", CLUSTER_RATE))
