"""The Grafana dashboards (deploy/dashboards) and the alert rules ask only for metrics the
services export: every PromQL query is parsed, and every metric it selects must be one the
services' modules register with prometheus_client (a histogram as `_bucket`, `_sum` or
`_count`, a counter with its `_total`), so a renamed or removed metric fails deploy-check
instead of leaving an empty panel or an alert that can never fire."""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client import REGISTRY

from tools.deploy.layout import DEPLOY_DIR, overlay_dir

DASHBOARDS_DIR = DEPLOY_DIR / "dashboards"
ALERTS_FILE = overlay_dir("prod") / "alerts.yaml"
# The packages whose modules declare the metrics (infra's shared ones, each service's own).
METRIC_PACKAGES = ("infra", "services")
_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_metric_names(packages: Iterable[str] = METRIC_PACKAGES) -> frozenset[str]:
    """The series names the services can export: every module of `packages` imported (a
    metric is declared at import), then the default registry read."""
    for package in packages:
        root = importlib.import_module(package)
        for module in pkgutil.walk_packages(root.__path__, f"{package}."):
            importlib.import_module(module.name)
    return frozenset(
        f"{family.name}{suffix}"
        for family in REGISTRY.collect()
        for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",))
    )


def selected_metrics(expr: str) -> list[str | None]:
    """The metric name of every selector of a PromQL expression (None: a selector without
    one); ValueError when it does not parse."""
    names: list[str | None] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name or None)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def query_problems(queries: Iterable[tuple[str, str]], exported: frozenset[str]) -> list[str]:
    """(where, expr) pairs -> what is wrong with each: unparsable, a selector naming no
    metric, a metric no service exports."""
    problems = []
    for where, expr in queries:
        try:
            names = selected_metrics(expr)
        except ValueError as error:
            problems.append(f"{where}: not PromQL: {error}")
            continue
        if not names:
            problems.append(f"{where}: selects no metric")
        for name in names:
            if name is None:
                problems.append(f"{where}: a selector without a metric name")
            elif name not in exported:
                problems.append(f"{where}: {name} is not exported by any service")
    return problems


def dashboard_files(directory: Path = DASHBOARDS_DIR) -> list[Path]:
    return sorted(directory.glob("*.json"))


def dashboard_queries(path: Path) -> Iterator[tuple[str, str]]:
    dashboard = json.loads(path.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            where = f"{path.name}: panel {panel['title']!r} query {target['refId']}"
            yield where, target["expr"]


def alert_queries(path: Path = ALERTS_FILE) -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(path.read_text())["spec"]["groups"]:
        for rule in group["rules"]:
            yield f"{path.name}: {rule['alert']}", rule["expr"]


def problems(
    directory: Path = DASHBOARDS_DIR,
    alerts: Path = ALERTS_FILE,
    exported: frozenset[str] | None = None,
) -> list[str]:
    """Every dashboard query and alert expression checked against the exported metrics."""
    known = exported_metric_names() if exported is None else exported
    files = dashboard_files(directory)
    found = [] if files else [f"{directory}: no dashboards"]
    queries = [q for path in files for q in dashboard_queries(path)]
    return found + query_problems([*queries, *alert_queries(alerts)], known)
