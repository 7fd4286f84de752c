"""The Grafana dashboards: one per service plus the end-to-end flow, shipped by the prod overlay
as labelled ConfigMaps, and every query in every panel (and every alert) names a metric the
services export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.deploy.conftest import Rendered
from tests.deploy.manifests import find, of_kind
from tools.deploy import dashboards
from tools.deploy.dashboards import (
    ALERTS_FILE,
    DASHBOARDS_DIR,
    exported_metric_names,
    query_problems,
)

SERVICE_DASHBOARDS = {
    "gateway",
    "seller-admin",
    "routing",
    "live-session",
    "live-catalog",
    "outbox",
}


@pytest.fixture(scope="module")
def exported() -> frozenset[str]:
    return exported_metric_names()


def test_one_dashboard_per_service_and_one_for_the_flow() -> None:
    files = dashboards.dashboard_files()
    assert {path.stem for path in files} == SERVICE_DASHBOARDS | {"flow"}
    boards = [json.loads(path.read_text()) for path in files]
    assert len({board["uid"] for board in boards}) == len(boards)
    for board in boards:
        assert board["panels"], board["title"]
        for panel in board["panels"]:
            assert panel["targets"], f"{board['title']}: {panel['title']}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_panel_query_and_alert_names_an_exported_metric(exported: frozenset[str]) -> None:
    assert dashboards.problems(exported=exported) == []


def test_a_panel_naming_a_metric_no_service_exports_fails(
    tmp_path: Path, exported: frozenset[str]
) -> None:
    copy = tmp_path / "dashboards"
    shutil.copytree(DASHBOARDS_DIR, copy)
    board = json.loads((copy / "outbox.json").read_text())
    board["panels"][0]["targets"][0]["expr"] = "sum(rate(snapsell_outbox_messages_sent_total[5m]))"
    (copy / "outbox.json").write_text(json.dumps(board))
    assert dashboards.problems(copy, ALERTS_FILE, exported) == [
        f"outbox.json: panel {board['panels'][0]['title']!r} query A: "
        "snapsell_outbox_messages_sent_total is not exported by any service"
    ]


def test_histograms_count_by_their_series_and_counters_by_total(
    exported: frozenset[str],
) -> None:
    assert {
        "snapsell_outbox_enqueue_to_accepted_seconds_bucket",
        "snapsell_outbox_enqueue_to_accepted_seconds_count",
        "snapsell_outbox_send_results_total",
        "snapsell_queue_depth",
    } <= exported
    queries = [
        ("bare histogram", "rate(snapsell_outbox_enqueue_to_accepted_seconds[5m])"),
        ("counter without _total", "rate(snapsell_outbox_send_results[5m])"),
        ("no name", 'sum({queue="outbox.messages"})'),
        ("not promql", "sum(rate(snapsell_queue_depth[5m])"),
        ("only a number", "1"),
    ]
    found = query_problems(queries, exported)
    assert [line.split(":")[0] for line in found] == [q[0] for q in queries]


def test_prod_ships_each_dashboard_as_a_configmap_grafana_loads(rendered: Rendered) -> None:
    for path in dashboards.dashboard_files():
        config_map = find(rendered["prod"], "ConfigMap", f"snapsell-dashboard-{path.stem}")
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == "snapsell"
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())
    local = of_kind(rendered["local"], "ConfigMap")
    assert not [c for c in local if c["metadata"]["name"].startswith("snapsell-dashboard-")]
