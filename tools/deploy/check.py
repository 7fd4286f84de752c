"""`make deploy-check`: render every overlay, validate the built-in kinds offline against the
Kubernetes schemas, and apply the deployment policies. Needs no cluster and no network."""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from tools.deploy import dashboards, installation, policy
from tools.deploy.layout import (
    DEPLOY_DIR,
    INSTALLATIONS,
    KUBERNETES_VERSION,
    OPERATIONS_DOC,
    OVERLAYS,
    PLACEHOLDER_MARK,
    overlay_dir,
)
from tools.deploy.render import Manifest, RenderError, parse, render
from tools.deploy.schema import validate_schemas

_SECRET_ROW = re.compile(r"^\|\s*`([a-z0-9][a-z0-9.-]*)`\s*\|", re.MULTILINE)
_HOLDERS_COLUMN = "Pods that hold it"
# The overlay the production-only rules (reflection off, mTLS) apply to.
PRODUCTION_OVERLAY = "prod"
TEMPLATE_REPORT = "installation-template"


@dataclass(frozen=True)
class OverlayReport:
    overlay: str
    objects: int
    validated: int
    skipped: tuple[str, ...]
    problems: tuple[str, ...]


def _secrets_section(operations_doc: Path) -> str:
    text = operations_doc.read_text()
    match = re.search(r"^## Secrets\b(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError(f"{operations_doc}: no '## Secrets' section")
    return match.group(1)


def documented_secrets(operations_doc: Path = OPERATIONS_DOC) -> frozenset[str]:
    """Secret names from the table of the "Secrets" section of docs/OPERATIONS.md."""
    return frozenset(_SECRET_ROW.findall(_secrets_section(operations_doc)))


def secret_holders(operations_doc: Path = OPERATIONS_DOC) -> policy.SecretHolders:
    """Secret -> the workloads named (in backticks) in the table's "Pods that hold it"
    column: the one declaration of which pod may hold which Secret."""
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in _secrets_section(operations_doc).splitlines()
        if line.startswith("|")
    ]
    header = rows[0] if rows else []
    if _HOLDERS_COLUMN not in header:
        raise ValueError(f"{operations_doc}: the Secrets table has no '{_HOLDERS_COLUMN}' column")
    column = header.index(_HOLDERS_COLUMN)
    holders: dict[str, frozenset[str]] = {}
    for row in rows[1:]:
        name = re.fullmatch(r"`([a-z0-9][a-z0-9.-]*)`", row[0])
        if name is not None and len(row) > column:
            holders[name.group(1)] = frozenset(re.findall(r"`([a-z0-9-]+)`", row[column]))
    return holders


def check_documents(
    overlay: str,
    docs: Sequence[Manifest],
    secrets: frozenset[str],
    holders: policy.SecretHolders | None = None,
    production: bool | None = None,
) -> OverlayReport:
    schema = validate_schemas(docs, KUBERNETES_VERSION)
    problems = [f"schema: {line}" for line in schema.problems]
    production = overlay == PRODUCTION_OVERLAY if production is None else production
    for name, rule in policy.rules(secrets, holders, production=production).items():
        problems += [f"{name}: {line}" for line in rule(docs)]
    return OverlayReport(overlay, len(docs), schema.validated, schema.skipped, tuple(problems))


def check_overlay(
    overlay: str,
    deploy_dir: Path,
    secrets: frozenset[str],
    holders: policy.SecretHolders | None = None,
) -> OverlayReport:
    try:
        docs = parse(render(overlay_dir(overlay, deploy_dir)))
    except RenderError as error:
        return OverlayReport(overlay, 0, 0, (), (f"render: {error}",))
    return check_documents(overlay, docs, secrets, holders)


# What `make deploy-init` is given when deploy-check tries the template.
_EXAMPLE_VALUES = installation.Values(
    host="messaging.example.com",
    image_repo="registry.example.com/snapsell/messaging",
    backup_path="s3://example-backups/snapsell-pg",
)


def check_template(
    deploy_dir: Path, secrets: frozenset[str], holders: policy.SecretHolders | None = None
) -> OverlayReport:
    """An installation made from the template with every value given: it renders, passes the
    production rules, and leaves no placeholder (the template covers every one of prod's)."""
    with tempfile.TemporaryDirectory(prefix="snapsell-template-") as tmp:
        copy = Path(tmp) / "deploy"
        shutil.copytree(deploy_dir, copy, ignore=shutil.ignore_patterns(INSTALLATIONS))
        try:
            made = installation.create("template-check", _EXAMPLE_VALUES, copy)
            stream = render(made)
        except (installation.InstallationError, RenderError) as error:
            return OverlayReport(TEMPLATE_REPORT, 0, 0, (), (f"render: {error}",))
        report = check_documents(TEMPLATE_REPORT, parse(stream), secrets, holders, production=True)
        left = [line for line in stream.splitlines() if PLACEHOLDER_MARK in line]
    problems = [f"placeholder not covered by the template: {line.strip()}" for line in left]
    return replace(report, problems=report.problems + tuple(problems))


def run_check(
    deploy_dir: Path = DEPLOY_DIR,
    operations_doc: Path = OPERATIONS_DOC,
    overlays: Sequence[str] = OVERLAYS,
    out: TextIO = sys.stdout,
) -> int:
    secrets = documented_secrets(operations_doc)
    holders = secret_holders(operations_doc)
    failures: list[str] = []

    def report_failures(section: str, problems: Sequence[str]) -> None:
        for line in problems:
            print(f"  FAIL {section}: {line}", file=out)
        failures.extend(problems)

    for overlay in overlays:
        report = check_overlay(overlay, deploy_dir, secrets, holders)
        skipped = ", ".join(report.skipped) or "none"
        print(
            f"deploy-check {overlay}: {report.objects} objects; {report.validated} valid for "
            f"Kubernetes {KUBERNETES_VERSION} or their vendored CRD (strict); custom resources "
            f"not schema-checked here: {skipped}",
            file=out,
        )
        report_failures(overlay, report.problems)
    report = check_template(deploy_dir, secrets, holders)
    print(f"deploy-check {TEMPLATE_REPORT}: {report.objects} objects (as prod)", file=out)
    report_failures(TEMPLATE_REPORT, report.problems)
    boards = deploy_dir / "dashboards"
    alerts = overlay_dir(PRODUCTION_OVERLAY, deploy_dir) / "alerts.yaml"
    print(
        f"deploy-check metrics: the queries of {len(dashboards.dashboard_files(boards))} "
        "dashboards and of the alert rules, against the metrics the services export",
        file=out,
    )
    report_failures("metrics", dashboards.problems(boards, alerts))
    dockerfile = (deploy_dir / "Dockerfile").read_text()
    report_failures("image", policy.dockerfile_bases_by_digest(dockerfile))
    print("deploy-check: " + ("FAILED" if failures else "ok"), file=out)
    return 1 if failures else 0
