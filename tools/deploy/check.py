"""`make deploy-check`: render every overlay, validate the built-in kinds offline against the
Kubernetes schemas, and apply the deployment policies. Needs no cluster and no network."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tools.deploy import policy
from tools.deploy.layout import (
    DEPLOY_DIR,
    KUBERNETES_VERSION,
    OPERATIONS_DOC,
    OVERLAYS,
    overlay_dir,
)
from tools.deploy.render import Manifest, RenderError, parse, render
from tools.deploy.schema import validate_builtin

_SECRET_ROW = re.compile(r"^\|\s*`([a-z0-9][a-z0-9.-]*)`\s*\|", re.MULTILINE)


@dataclass(frozen=True)
class OverlayReport:
    overlay: str
    objects: int
    validated: int
    skipped: tuple[str, ...]
    problems: tuple[str, ...]


def documented_secrets(operations_doc: Path = OPERATIONS_DOC) -> frozenset[str]:
    """Secret names from the table of the "Secrets" section of docs/OPERATIONS.md."""
    text = operations_doc.read_text()
    match = re.search(r"^## Secrets\b(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError(f"{operations_doc}: no '## Secrets' section")
    return frozenset(_SECRET_ROW.findall(match.group(1)))


def check_documents(
    overlay: str, docs: Sequence[Manifest], secrets: frozenset[str]
) -> OverlayReport:
    schema = validate_builtin(docs, KUBERNETES_VERSION)
    problems = [f"schema: {line}" for line in schema.problems]
    for name, rule in policy.rules(secrets, overlay).items():
        problems += [f"{name}: {line}" for line in rule(docs)]
    return OverlayReport(overlay, len(docs), schema.validated, schema.skipped, tuple(problems))


def check_overlay(overlay: str, deploy_dir: Path, secrets: frozenset[str]) -> OverlayReport:
    try:
        docs = parse(render(overlay_dir(overlay, deploy_dir)))
    except RenderError as error:
        return OverlayReport(overlay, 0, 0, (), (f"render: {error}",))
    return check_documents(overlay, docs, secrets)


def run_check(
    deploy_dir: Path = DEPLOY_DIR,
    operations_doc: Path = OPERATIONS_DOC,
    overlays: Sequence[str] = OVERLAYS,
    out: TextIO = sys.stdout,
) -> int:
    secrets = documented_secrets(operations_doc)
    failed = False
    for overlay in overlays:
        report = check_overlay(overlay, deploy_dir, secrets)
        skipped = ", ".join(report.skipped) or "none"
        print(
            f"deploy-check {overlay}: {report.objects} objects; {report.validated} valid for "
            f"Kubernetes {KUBERNETES_VERSION} (strict); custom resources not schema-checked "
            f"here: {skipped}",
            file=out,
        )
        for line in report.problems:
            print(f"  FAIL {overlay}: {line}", file=out)
        failed = failed or bool(report.problems)
    print("deploy-check: " + ("FAILED" if failed else "ok"), file=out)
    return 1 if failed else 0
