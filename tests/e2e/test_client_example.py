"""The example client of contracts/python/README.md works as documented: built into the
`snapsell-contracts` wheel, installed on its own, and run with a bearer token against routing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import shop_from_cli
from tests.e2e.harness import Harness, new_mobile
from tests.support.polling import eventually
from tools.stack import ROOT, SystemStack

CONTRACTS = ROOT / "contracts" / "python"
EXAMPLE = CONTRACTS / "examples" / "list_opt_outs.py"


@pytest.fixture(scope="module")
def installed_contracts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel as the README builds it, installed into a directory of its own."""
    work = tmp_path_factory.mktemp("contracts")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), CONTRACTS],
        check=True,
        timeout=300,
    )
    (wheel,) = (work / "dist").glob("snapsell_contracts-*.whl")
    site = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), wheel], check=True)
    return site


async def run_example(site: Path, address: str, token: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        *args,
        # Away from the repository: the example needs the wheel, nothing of the services.
        cwd=site.parent,
        env={"PYTHONPATH": str(site), "SNAPSELL_TOKEN": token, "ROUTING_ADDR": address},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_example_client_lists_opt_outs_with_an_owner_token(
    system: SystemStack,
    harness: Harness,
    installed_contracts: Path,
    make_token: Callable[..., str],
) -> None:
    shop = shop_from_cli(system, "client-team")
    client = new_mobile()
    await harness.send(shop, client, "STOP")
    token = make_token("owner", tenant_id=shop.tenant_id, audience="routing")

    async def listed() -> str | None:
        code, out, err = await run_example(installed_contracts, system.address("routing"), token)
        assert code == 0, err
        return out or None

    out = await eventually(listed)
    (line,) = out.splitlines()
    assert line.split()[0] == client


async def test_the_example_client_reports_a_refusal_in_one_line(
    system: SystemStack, installed_contracts: Path, make_token: Callable[..., str]
) -> None:
    wrong_audience = make_token("owner", tenant_id="some-shop", audience="outbox")
    code, out, err = await run_example(
        installed_contracts, system.address("routing"), wrong_audience
    )
    assert (code, out) == (1, "")
    assert err == "error: UNAUTHENTICATED: token audience not accepted\n"

    staff = make_token("staff", tenant_id="some-shop", audience="routing")
    code, _, err = await run_example(installed_contracts, system.address("routing"), staff)
    assert code == 1 and err.startswith("error: PERMISSION_DENIED: ")
