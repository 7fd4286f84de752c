"""docs/OPERATIONS.md's runbooks use the operator CLI, and every command they show is one the CLI
accepts; the ports they forward are the ones the CLI calls by default and the Services expose."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from services.seller_admin import cli
from tools.deploy.layout import DEPLOY_DIR, OPERATIONS_DOC

DOC = OPERATIONS_DOC.read_text()


def shell_lines(text: str) -> list[str]:
    """Each command line of the ```sh blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        lines += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def shell_commands(text: str) -> list[list[str]]:
    """Each command's words, comments dropped."""
    return [
        words for words in (shlex.split(line, comments=True) for line in shell_lines(text)) if words
    ]


CLI_LINES = [line.removeprefix("cli ") for line in shell_lines(DOC) if line.startswith("cli ")]


def test_the_runbooks_call_the_cli_not_grpcurl_or_python() -> None:
    programs = {words[0] for words in shell_commands(DOC)}
    assert "grpcurl" not in programs
    assert not re.search(r"python3? -c ", DOC)
    shown = {line.split()[0] for line in CLI_LINES}
    assert {
        "create-tenant",
        "add-channel",
        "add-seller",
        "list-channels",
        "issue-token",
        "list-dead-letters",
        "get-message",
        "redrive",
        "discard",
    } <= shown


@pytest.mark.parametrize("line", CLI_LINES)
def test_every_cli_command_in_the_runbooks_parses(line: str) -> None:
    # `[--option value]` marks an optional part: it must parse with and without it.
    optional = re.compile(r"\[([^\]]*)\]")
    for variant in (optional.sub(r"\1", line), optional.sub("", line)):
        cli._parser().parse_args(shlex.split(variant, comments=True))


def test_the_forwarded_ports_are_the_cli_defaults_and_the_services_ports() -> None:
    forwarded = {
        service: mapping
        for words in shell_commands(DOC)
        if words[:4] == ["kubectl", "-n", "snapsell", "port-forward"]
        for service, mapping in [(words[4].removeprefix("svc/"), words[5])]
    }
    for name, (_, default) in cli._SERVICE_ADDRESSES.items():
        service = name.replace("_", "-")
        port = default.rpartition(":")[2]
        assert forwarded[service] == f"{port}:{port}", service
        manifest = DEPLOY_DIR / "base" / service / f"{service}.yaml"
        exposed = [
            p["port"]
            for doc in yaml.safe_load_all(manifest.read_text())
            if doc and doc["kind"] == "Service"
            for p in doc["spec"]["ports"]
        ]
        assert int(port) in exposed, service
