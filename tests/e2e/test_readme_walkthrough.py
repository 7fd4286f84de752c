"""The README's walkthrough, run as written against the whole system: its command blocks in
order, and after each one the outcomes the README states (what the command prints, the log line
of the decision, what the sandbox sent).

The README is what a user types against `make run`; only the addresses change here (this stack
listens on free ports): `SNAPSELL_STATE_DIR` points the CLI and `make webhook` at a state
directory laid out as `make run`'s (this stack's keys and sandbox account), so they find their
credentials with nothing else exported, as they do under `make run`. `make webhook VAR=...` runs
the command that target runs (`python -m tools.send_webhook`).

Expectations (a ```text block after a command's ```sh block), one per line, `…` for anything:
- `log: {...}`: a new log line of any service holds these fields;
- `sandbox: nothing sent to X` / `nothing new to X`: the sandbox got nothing more for X;
- `sandbox: X got "..."`: the sandbox got a new message for X with this body;
- any other line: a line the command printed (stdout or stderr).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from tests.support.polling import eventually
from tools.stack import ROOT, SystemStack

README = ROOT / "README.md"
SECTION = "### Walkthrough: a shop, its seller and a client"
ANY = "…"
T = TypeVar("T")
_WEBHOOK_OPTIONS = {"BODY": "--body", "FROM": "--from", "TO": "--to"}


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def walkthrough_steps(readme: str) -> list[Step]:
    """Each ```sh block's commands, the last one carrying the ```text block that follows."""
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    steps: list[Step] = []
    for language, body in re.findall(r"^```(\w+)\n(.*?)^```$", section, re.M | re.S):
        if language == "sh":
            joined = body.replace("\\\n", " ")
            steps += [Step(line.strip()) for line in joined.splitlines() if line.strip()]
        elif language == "text" and steps:
            steps[-1].expected += [line for line in body.splitlines() if line.strip()]
    return steps


def argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[:2] == ["make", "webhook"]:
        options = dict(word.split("=", 1) for word in words[2:])
        args = [arg for name, value in options.items() for arg in (_WEBHOOK_OPTIONS[name], value)]
        return [sys.executable, "-m", "tools.send_webhook", *args]
    assert words[0] == ".venv/bin/python", (
        f"the walkthrough runs only what this test knows: {command}"
    )
    return [sys.executable, *words[1:]]


def pattern(expected: str) -> re.Pattern[str]:
    return re.compile(".*?".join(re.escape(part) for part in expected.split(ANY)), re.S)


def local_state(stack: SystemStack, directory: Path) -> Path:
    """A state directory laid out as `make run` leaves `.state/`, holding this stack's keys."""
    state = directory / ".state"
    state.mkdir()
    (state / "keys").symlink_to(stack.keys.directory, target_is_directory=True)
    credentials = {"TWILIO_ACCOUNT_SID": stack.account_sid, "TWILIO_AUTH_TOKEN": stack.auth_token}
    (state / "dev-credentials.json").write_text(json.dumps(credentials))
    return state


class Outcomes:
    def __init__(self, stack: SystemStack) -> None:
        self.stack = stack
        self.log_offsets: dict[str, int] = {}
        self.sent_before: dict[str, int] = {}

    def mark(self) -> None:
        self.log_offsets = {name: path.stat().st_size for name, path in self._logs().items()}

    def _logs(self) -> dict[str, Path]:
        return self.stack.log_files()

    def new_log_records(self) -> list[dict[str, object]]:
        records = []
        for name, path in self._logs().items():
            with path.open("rb") as log:
                log.seek(self.log_offsets.get(name, 0))
                lines = log.read().decode(errors="replace").splitlines()
            records += [json.loads(line) for line in lines if line.startswith("{")]
        return records

    async def sandbox_bodies(self, to: str) -> list[str]:
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.get(f"{self.stack.sandbox_url}/_sandbox/messages")
        reply.raise_for_status()
        return [str(m["body"]) for m in reply.json()["messages"] if m["to"] == to]

    async def check(self, line: str, printed: str) -> None:
        if line.startswith("log: "):
            await self._logged(json.loads(line.removeprefix("log: ").replace(f", {ANY}}}", "}")))
        elif line.startswith("sandbox: nothing "):
            to = line.rsplit(" ", 1)[1]
            await asyncio.sleep(1.0)  # what would have been sent by now was decided already
            bodies = await self.sandbox_bodies(to)
            assert len(bodies) == self.sent_before.get(to, 0), f"{line}: got {bodies}"
        elif line.startswith("sandbox: "):
            matched = re.fullmatch(r'sandbox: (\S+) got "(.*)"', line)
            assert matched, f"not an expectation: {line}"
            to, body = matched.groups()
            bodies = await eventually(lambda: self._new_bodies(to), line)
            assert any(pattern(body).fullmatch(got) for got in bodies), f"{line}: got {bodies}"
        else:
            lines = printed.splitlines()
            assert any(pattern(line).fullmatch(got) for got in lines), f"{line!r} not in {printed}"

    async def _new_bodies(self, to: str) -> list[str]:
        return (await self.sandbox_bodies(to))[self.sent_before.get(to, 0) :]

    async def _logged(self, fields: dict[str, object]) -> None:
        async def found() -> list[dict[str, object]]:
            records = self.new_log_records()
            return [r for r in records if all(r.get(k) == v for k, v in fields.items())]

        await eventually(found, f"log line {fields}")


def test_the_walkthrough_is_in_the_readme_with_a_separate_client() -> None:
    steps = walkthrough_steps(README.read_text())
    commands = " ".join(step.command for step in steps)
    for body in ("A12", "HELP", "Stop", "START"):
        assert f"BODY={body} FROM=whatsapp:+33698765432" in commands
    assert "tools.send_message" in commands and "FROM=whatsapp:+33612345678" in commands
    assert all(step.expected for step in steps), "every command says what to expect"


async def test_the_readme_walkthrough_runs_as_written(system: SystemStack, tmp_path: Path) -> None:
    state = local_state(system, tmp_path)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SNAPSELL_STATE_DIR": str(state),
        "SELLER_ADMIN_ADDR": system.address("seller_admin"),
        "OUTBOX_ADDR": system.address("outbox"),
        "PUBLIC_BASE_URL": system.public_base_url,
    }
    outcomes = Outcomes(system)
    for step in walkthrough_steps(README.read_text()):
        outcomes.mark()
        for to in ("whatsapp:+33698765432", "whatsapp:+33612345678"):
            outcomes.sent_before[to] = len(await outcomes.sandbox_bodies(to))
        done = await asyncio.to_thread(
            subprocess.run,
            argv(step.command),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        printed = done.stderr + done.stdout
        assert done.returncode == 0, f"{step.command}\n{printed}"
        for line in step.expected:
            await outcomes.check(line, printed)
