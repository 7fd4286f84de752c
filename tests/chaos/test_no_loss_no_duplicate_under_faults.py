"""Issue #8's fault suite: while a steady load of signed webhooks and enqueued messages runs
through the whole system (every service its own process, the Twilio sandbox, PostgreSQL and
NATS), every fault kind strikes; afterwards nothing is lost, nothing is doubled and consent was
never broken. The counts are printed: `make chaos` runs it with 5,000 webhooks, `make test`
with `load.DEFAULT_WEBHOOKS`."""

from __future__ import annotations

from tests.chaos.faults import ChaosWorld, fault_plan
from tests.chaos.load import LoadSize, rate_from_env
from tests.chaos.scenario import Scenario, run_scenario


async def test_every_message_is_handled_once_and_consent_holds_through_faults(
    chaos_world: ChaosWorld,
) -> None:
    scenario = Scenario(
        title="chaos",
        stack=chaos_world.stack,
        postgres_dsn=chaos_world.postgres.dsn,
        nats_url=chaos_world.nats.url,
        processes=chaos_world.processes,
        plan=fault_plan(chaos_world),
    )
    await run_scenario(scenario, LoadSize.from_env(), rate_from_env())
