"""What operators do by hand goes through the CLI: each command reaches the service that owns the
data (seller_admin, routing, outbox) with an admin token for that service, prints JSON, and a
refusal is one line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

from snapsell.outbox.v1 import outbox_pb2

from tests.e2e.conftest import shop_from_cli
from tests.e2e.harness import Harness, Shop, new_mobile
from tests.support.polling import eventually
from tools.stack import ROOT, SystemStack


def operator(stack: SystemStack, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator runs it, told where each service listens."""
    env = {
        "PATH": "/usr/bin:/bin",
        **stack.keys.env("operator"),
        "SELLER_ADMIN_ADDR": stack.address("seller_admin"),
        "ROUTING_ADDR": stack.address("routing"),
        "OUTBOX_ADDR": stack.address("outbox"),
    }
    return subprocess.run(
        [sys.executable, "-m", "services.seller_admin.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def ok(stack: SystemStack, *args: str) -> dict[str, Any]:
    done = await asyncio.to_thread(operator, stack, *args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


async def test_tenants_channels_and_sellers_are_listed_and_removed(system: SystemStack) -> None:
    shop = shop_from_cli(system, "ops-sellers")
    tenants = await ok(system, "list-tenants")
    assert shop.tenant_id in [t["tenantId"] for t in tenants["tenants"]]
    channels = await ok(system, "list-channels", "--tenant", shop.tenant_id)
    assert [c["address"] for c in channels["channels"]] == [shop.sender]

    removed = await ok(system, "remove-seller", "--tenant", shop.tenant_id, "--phone", shop.seller)
    assert removed["sellerPhone"]["address"] == shop.seller
    left = await ok(system, "list-sellers", "--tenant", shop.tenant_id)
    assert left["sellerPhones"] == []


async def test_consent_is_listed_and_set_through_routing(system: SystemStack) -> None:
    shop = shop_from_cli(system, "ops-consent")
    client = new_mobile()
    consent = ("set-consent", "--tenant", shop.tenant_id, "--address", f"whatsapp:{client}")
    withdrawn = await ok(system, *consent, "--state", "opted-out", "--reason", "asked by phone")
    assert (withdrawn["changed"], withdrawn["optedOut"]) == (True, True)
    listed = await ok(system, "list-opt-outs", "--tenant", shop.tenant_id)
    assert [o["address"]["value"] for o in listed["optOuts"]] == [client]
    assert listed["optOuts"][0]["source"] == "CONSENT_SOURCE_OPERATOR"

    given = await ok(system, *consent, "--state", "opted-in", "--reason", "came back")
    assert (given["changed"], given["optedOut"]) == (True, False)
    assert (await ok(system, "list-opt-outs", "--tenant", shop.tenant_id))["optOuts"] == []


async def test_dead_letters_are_listed_redriven_and_discarded(
    system: SystemStack, harness: Harness
) -> None:
    shop: Shop = shop_from_cli(system, "ops-dead")
    # A free-form WhatsApp message to someone who never wrote is dead-lettered at once.
    message_id = await harness.enqueue(shop, new_mobile(), "your order is ready")
    await harness.wait_status(shop, message_id, outbox_pb2.MESSAGE_STATUS_DEAD)

    dead = await ok(
        system,
        "list-dead-letters",
        "--tenant",
        shop.tenant_id,
        "--reason",
        "outside-session-window",
    )
    assert [m["messageId"] for m in dead["messages"]] == [message_id]
    other = await ok(
        system, "list-dead-letters", "--tenant", shop.tenant_id, "--reason", "permanent-error"
    )
    assert other["messages"] == []

    message = await ok(system, "get-message", "--tenant", shop.tenant_id, message_id)
    assert message["message"]["status"] == "MESSAGE_STATUS_DEAD"
    assert message["message"]["deadReason"] == "DEAD_REASON_OUTSIDE_SESSION_WINDOW"

    redriven = await ok(system, "redrive", "--tenant", shop.tenant_id, message_id)
    assert redriven["redrivenMessageIds"] == [message_id]
    # Still outside the window: it dies again, and is given up on for good.
    await harness.wait_status(shop, message_id, outbox_pb2.MESSAGE_STATUS_DEAD)
    discarded = await ok(
        system, "discard", "--tenant", shop.tenant_id, "--reason", "client unreachable", message_id
    )
    assert discarded["discardedMessageIds"] == [message_id]
    assert (await ok(system, "list-dead-letters", "--tenant", shop.tenant_id))["messages"] == []


async def test_the_audit_trail_names_who_changed_what_in_every_service(
    system: SystemStack, harness: Harness
) -> None:
    since = datetime.now(UTC).isoformat()
    shop = shop_from_cli(system, "ops-audit")
    tenant = ("--tenant", shop.tenant_id)
    client = new_mobile()
    await ok(
        system,
        *("--as", "ops:alice", "set-consent", *tenant, "--address", f"whatsapp:{client}"),
        *("--state", "opted-out", "--reason", "asked by phone"),
    )
    message_id = await harness.enqueue(shop, new_mobile(), "your order is ready")
    await harness.wait_status(shop, message_id, outbox_pb2.MESSAGE_STATUS_DEAD)
    await ok(system, "--as", "ops:bob", "redrive", *tenant, message_id)
    await harness.wait_status(shop, message_id, outbox_pb2.MESSAGE_STATUS_DEAD)
    await ok(system, "--as", "ops:bob", "discard", *tenant, "--reason", "gone", message_id)
    await ok(system, "--as", "ops:alice", "remove-seller", *tenant, "--phone", shop.seller)
    expected = [
        ("operator-cli", "seller_admin.v1.tenant.created"),
        ("operator-cli", "seller_admin.v1.channel.added"),
        ("operator-cli", "seller_admin.v1.seller_phone.added"),
        ("ops:alice", "routing.v1.opt_out.recorded"),
        ("ops:bob", "outbox.v1.message.redriven"),
        ("ops:bob", "outbox.v1.message.discarded"),
        ("ops:alice", "seller_admin.v1.seller_phone.removed"),
    ]

    async def trail() -> list[dict[str, Any]]:
        records = (await ok(system, "audit", *tenant, "--since", since))["records"]
        return list(records) if len(records) >= len(expected) else []

    records = await eventually(trail, "every change in the audit trail")
    assert [(r["actor"], r["action"]) for r in records] == expected
    assert {r["tenantId"] for r in records} == {shop.tenant_id}
    consent, redrive, discard = records[3:6]
    assert consent["target"] == f"whatsapp:{client}"
    assert consent["details"]["reason"] == "asked by phone"
    assert redrive["target"] == discard["target"] == message_id
    assert discard["details"]["reason"] == "gone"
    until = records[4]["occurredAt"]
    window = await ok(system, "audit", *tenant, "--since", since, "--until", until)
    assert [(r["actor"], r["action"]) for r in window["records"]] == expected[:5]


async def test_operator_commands_fail_in_one_line(system: SystemStack) -> None:
    done = await asyncio.to_thread(operator, system, "redrive", "--tenant", "nobody", "not-an-id")
    assert done.returncode == 1
    assert done.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert done.stderr.count("\n") == 1
    done = await asyncio.to_thread(
        operator,
        system,
        "set-consent",
        "--tenant",
        "t",
        "--address",
        "fax:+1",
        "--state",
        "opted-in",
    )
    assert done.returncode == 2
    assert (
        done.stderr == "error: --address 'fax:+1' must start with one of messenger:, sms:, "
        "whatsapp: or be +E164\n"
    )
