"""Offline schema validation: the built-in kinds of every overlay are valid for Kubernetes
1.32 with unknown fields rejected; custom resources are skipped by name, never silently."""

from __future__ import annotations

from tools.deploy.layout import KUBERNETES_VERSION
from tools.deploy.render import Manifest
from tools.deploy.schema import CUSTOM_KINDS, is_custom, validate_schemas

from .manifests import container, find


def test_builtin_kinds_are_valid_and_only_listed_custom_resources_skipped(
    docs: list[Manifest],
) -> None:
    report = validate_schemas(docs, KUBERNETES_VERSION)
    assert report.problems == ()
    assert report.validated == sum(1 for doc in docs if not is_custom(doc))
    custom = {
        f"{doc['kind']}/{doc['metadata']['name']}"
        for doc in docs
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS
    }
    assert set(report.skipped) == custom
    assert "Cluster/snapsell-pg" in custom


def test_misspelt_field_is_rejected(rendered: dict[str, list[Manifest]]) -> None:
    deployment = find(rendered["prod"], "Deployment", "gateway")
    gateway = container(deployment, "gateway")
    gateway["readinesProbe"] = gateway.pop("readinessProbe")
    report = validate_schemas([deployment], KUBERNETES_VERSION)
    assert len(report.problems) == 1
    assert report.problems[0].startswith("Deployment/gateway: spec.template.spec.containers.0")
    assert "readinesProbe" in report.problems[0]


def test_wrong_type_is_rejected(rendered: dict[str, list[Manifest]]) -> None:
    autoscaler = find(rendered["prod"], "HorizontalPodAutoscaler", "gateway")
    autoscaler["spec"]["maxReplicas"] = "ten"
    report = validate_schemas([autoscaler], KUBERNETES_VERSION)
    assert [p.split(":")[0] for p in report.problems] == ["HorizontalPodAutoscaler/gateway"]


def test_unlisted_custom_resource_is_an_error_not_a_skip() -> None:
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "snapsell", "namespace": "snapsell"},
        "spec": {},
    }
    report = validate_schemas([monitor], KUBERNETES_VERSION)
    assert report.skipped == ()
    assert len(report.problems) == 1
    assert "PodMonitor/snapsell: no Kubernetes 1.32.0 schema" in report.problems[0]
