"""The SLO alert rules are a file the prod overlay applies (a PrometheusRule), and the
operations guide lists exactly those alerts."""

from __future__ import annotations

import re

import yaml

from tests.deploy.conftest import Rendered
from tests.deploy.manifests import find
from tools.deploy.layout import OPERATIONS_DOC, overlay_dir
from tools.deploy.schema import CUSTOM_KINDS

ALERTS_FILE = overlay_dir("prod") / "alerts.yaml"


def alert_names(rule: dict[str, object]) -> list[str]:
    spec = rule["spec"]
    assert isinstance(spec, dict)
    return [r["alert"] for group in spec["groups"] for r in group["rules"]]


def test_prod_applies_the_alert_rules_file(rendered: Rendered) -> None:
    applied = find(rendered["prod"], "PrometheusRule", "snapsell-slo")
    in_file = yaml.safe_load(ALERTS_FILE.read_text())
    assert applied["spec"] == in_file["spec"]
    assert applied["metadata"]["namespace"] == "snapsell"
    assert ("monitoring.coreos.com/v1", "PrometheusRule") in CUSTOM_KINDS
    assert not [d for d in rendered["local"] if d["kind"] == "PrometheusRule"]


def test_every_rule_is_complete_and_has_a_severity() -> None:
    rules = [
        r for g in yaml.safe_load(ALERTS_FILE.read_text())["spec"]["groups"] for r in g["rules"]
    ]
    assert len(rules) == len({r["alert"] for r in rules}) > 0
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule["alert"]
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert {"summary", "runbook"} <= set(rule["annotations"]), rule["alert"]


def test_the_operations_guide_points_to_the_file_and_lists_its_alerts() -> None:
    docs = OPERATIONS_DOC.read_text()
    section = docs.split("### Alert rules", 1)[1].split("\n### ", 1)[0]
    assert "deploy/overlays/prod/alerts.yaml" in section
    assert "```yaml" not in section  # one copy of the rules: the file
    listed = re.findall(r"^\| `(Snapsell\w+)` \|", section, flags=re.MULTILINE)
    assert listed == alert_names(yaml.safe_load(ALERTS_FILE.read_text()))
