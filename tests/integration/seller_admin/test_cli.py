"""The operator CLI bootstraps a shop against a real server, and its tokens are accepted."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from snapsell.seller_admin.v1 import seller_admin_pb2 as pb
from snapsell.seller_admin.v1 import seller_admin_pb2_grpc

from infra.keys import OPERATOR
from tests.integration.seller_admin.conftest import ACCOUNT_SID
from tools.dev_keys import DevKeys
from tools.stack import ROOT


async def cli(token_keys: DevKeys, server_address: str, *args: str) -> tuple[int, str, str]:
    # A real child process; asyncio's so the in-process server keeps serving meanwhile.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.seller_admin.cli",
        *args,
        cwd=ROOT,
        env={
            **os.environ,
            **token_keys.env("operator"),
            "SELLER_ADMIN_ADDR": server_address,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_shop_is_bootstrapped_from_the_command_line(
    server_address: str, stub: seller_admin_pb2_grpc.SellerAdminServiceStub, token_keys: DevKeys
) -> None:
    code, out, err = await cli(
        token_keys, server_address, "create-tenant", "--tenant", "cli-shop", "--name", "Chez CLI"
    )
    assert code == 0, err
    assert json.loads(out)["created"] is True

    code, out, err = await cli(
        token_keys,
        server_address,
        "add-channel",
        "--tenant",
        "cli-shop",
        "--address",
        "whatsapp:+14155550123",
    )
    assert code == 0, err
    assert json.loads(out)["channel"]["accountSid"] == ACCOUNT_SID

    code, out, err = await cli(
        token_keys,
        server_address,
        "add-channel",
        "--tenant",
        "cli-shop",
        "--address",
        "+14155550124",
        "--alphanumeric-sender",
        "Chez CLI",
    )
    assert code == 0, err
    assert json.loads(out)["channel"]["alphanumericSenderId"] == "Chez CLI"

    for created in (True, False):
        code, out, err = await cli(
            token_keys,
            server_address,
            "add-seller",
            "--tenant",
            "cli-shop",
            "--phone",
            "+33 6 55 44 33 22",
        )
        assert code == 0, err
        reply = json.loads(out)
        assert (reply["created"], reply["sellerPhone"]["address"]) == (created, "+33655443322")

    code, out, err = await cli(
        token_keys,
        server_address,
        "issue-token",
        "--role",
        "staff",
        "--tenant",
        "cli-shop",
        "--audience",
        "seller_admin",
    )
    assert code == 0, err
    listed = await stub.ListSellerPhones(
        pb.ListSellerPhonesRequest(), metadata=(("authorization", f"Bearer {out.strip()}"),)
    )
    assert [p.address for p in listed.seller_phones] == ["+33655443322"]

    code, out, err = await cli(token_keys, server_address, "list-sellers", "--tenant", "cli-shop")
    assert code == 0, err
    assert [p["address"] for p in json.loads(out)["sellerPhones"]] == ["+33655443322"]


async def test_refusals_are_one_line_errors(server_address: str, token_keys: DevKeys) -> None:
    code, _, err = await cli(
        token_keys, server_address, "add-seller", "--tenant", "cli-nowhere", "--phone", "0612345678"
    )
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT: phone number")
    assert err.count("\n") == 1
    code, _, err = await cli(
        token_keys, server_address, "issue-token", "--role", "owner", "--audience", "routing"
    )
    assert code == 2 and "needs a tenant_id" in err


async def test_issued_tokens_are_short_lived_and_never_service_tokens(
    server_address: str, token_keys: DevKeys
) -> None:
    code, _, err = await cli(
        token_keys,
        server_address,
        "issue-token",
        "--role",
        "admin",
        "--audience",
        "outbox",
        "--ttl",
        "3601",
    )
    assert code == 2 and "--ttl must be between 1 and 3600" in err
    code, _, err = await cli(
        token_keys, server_address, "issue-token", "--role", "service", "--audience", "outbox"
    )
    assert code == 2 and "invalid choice" in err
    code, _, err = await cli(token_keys, server_address, "issue-token", "--role", "admin")
    assert code == 2 and "--audience" in err


async def _cli_with(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.seller_admin.cli",
        *args,
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_local_stack_credentials_fill_only_what_the_environment_leaves_unset(
    server_address: str, token_keys: DevKeys, tmp_path: Path
) -> None:
    # A state directory as `make run` leaves it, but with an operator key no service trusts:
    # used only when SNAPSELL_SIGNING_KEY_FILE is unset.
    state = tmp_path / ".state"
    untrusted = DevKeys(state / "keys", (OPERATOR,))
    (state / "dev-credentials.json").write_text(json.dumps({"TWILIO_ACCOUNT_SID": ACCOUNT_SID}))
    base = {"SNAPSELL_STATE_DIR": str(state), "SELLER_ADMIN_ADDR": server_address}
    add_channel = ("add-channel", "--tenant", "cli-local", "--address", "whatsapp:+14155550199")

    code, _, err = await _cli_with(
        {**base, **token_keys.env(OPERATOR)},
        "create-tenant",
        "--tenant",
        "cli-local",
        "--name",
        "Local",
    )
    assert (code, err) == (0, "")  # everything given: nothing taken from the state, nothing said

    code, out, err = await _cli_with({**base, **token_keys.env(OPERATOR)}, *add_channel)
    assert code == 0, err
    assert json.loads(out)["channel"]["accountSid"] == ACCOUNT_SID
    assert err == (
        f"using the local stack's Twilio account {ACCOUNT_SID} of {state}/dev-credentials.json"
        " (make run's; the environment wins)\n"
    )

    code, _, err = await _cli_with(base, "list-sellers", "--tenant", "cli-local")
    assert err.splitlines()[0] == (
        f"using the local stack's operator key {untrusted.directory}/operator.pem"
        " (make run's; the environment wins)"
    )
    assert code == 1 and "UNAUTHENTICATED" in err  # that key really was the one used

    code, _, err = await _cli_with(
        {**base, "SNAPSELL_STATE_DIR": str(tmp_path / "none")},
        "list-sellers",
        "--tenant",
        "cli-local",
    )
    assert (code, err) == (
        2,
        "error: SNAPSELL_SIGNING_KEY_FILE is required to sign as 'operator'\n",
    )
