"""The deployment policies hold for every overlay, and each one catches the defect it is
about (so a passing policy means something)."""

from __future__ import annotations

import re

import pytest

from tools.deploy.check import documented_secrets, secret_holders
from tools.deploy.layout import DEPLOY_DIR
from tools.deploy.policy import (
    SecretHolders,
    containers_are_locked_down,
    containers_have_probes,
    containers_have_resources,
    image_tag_problem,
    images_are_pinned,
    network_is_default_deny,
    only_the_gateway_is_exposed,
    otlp_endpoints_match_protocols,
    referenced_secrets,
    rules,
    scaled_services_have_autoscalers,
    secrets_are_referenced_not_inlined,
    workloads_have_disruption_budgets,
)
from tools.deploy.render import Manifest

from .manifests import container, find, find_generated


@pytest.fixture(scope="module")
def secrets() -> frozenset[str]:
    return documented_secrets()


@pytest.fixture(scope="module")
def holders() -> SecretHolders:
    return secret_holders()


@pytest.mark.parametrize("rule_name", list(rules(frozenset(), production=True)))
def test_every_policy_holds_for_every_overlay(
    docs: list[Manifest],
    overlay: str,
    rule_name: str,
    secrets: frozenset[str],
    holders: SecretHolders,
) -> None:
    applicable = rules(secrets, holders, production=overlay == "prod")
    if rule_name not in applicable:
        pytest.skip(f"{rule_name}: production only")
    assert applicable[rule_name](docs) == []


def test_missing_readiness_probe_is_reported(docs: list[Manifest]) -> None:
    del container(find(docs, "Deployment", "routing"), "routing")["readinessProbe"]
    assert containers_have_probes(docs) == [
        "Deployment/routing: container routing: no readinessProbe"
    ]


def test_missing_liveness_probe_on_nats_is_reported(docs: list[Manifest]) -> None:
    del container(find(docs, "StatefulSet", "nats"), "nats")["livenessProbe"]
    assert containers_have_probes(docs) == ["StatefulSet/nats: container nats: no livenessProbe"]


def test_missing_memory_limit_of_a_job_container_is_reported(docs: list[Manifest]) -> None:
    migrate = container(find(docs, "Job", "snapsell-migrate"), "outbox")
    del migrate["resources"]["limits"]["memory"]
    assert containers_have_resources(docs) == [
        "Job/snapsell-migrate: container outbox: no resources.limits.memory"
    ]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("readOnlyRootFilesystem", False, "readOnlyRootFilesystem is not true"),
        ("allowPrivilegeEscalation", True, "allowPrivilegeEscalation is not false"),
        ("capabilities", {"drop": ["NET_RAW"]}, "capabilities do not drop ALL"),
        ("privileged", True, "privileged"),
        ("runAsUser", 0, "runs as uid 0"),
    ],
)
def test_weakened_security_context_is_reported(
    docs: list[Manifest], field: str, value: object, expected: str
) -> None:
    container(find(docs, "Deployment", "gateway"), "gateway")["securityContext"][field] = value
    assert containers_are_locked_down(docs) == [
        f"Deployment/gateway: container gateway: {expected}"
    ]


def test_pod_without_run_as_non_root_is_reported(docs: list[Manifest]) -> None:
    pod = find(docs, "Deployment", "seller-admin")["spec"]["template"]["spec"]
    del pod["securityContext"]["runAsNonRoot"]
    problems = containers_are_locked_down(docs)
    assert problems == ["Deployment/seller-admin: container seller-admin: runAsNonRoot is not true"]


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("nats:latest", "image 'nats:latest' uses the latest tag"),
        ("nats", "image 'nats' has no tag"),
        ("registry.example.com:5000/snapsell/messaging", "has no tag"),
        ("registry.example.com:5000/snapsell/messaging:1.4.0", None),
        ("nats@sha256:" + "0" * 64, None),
    ],
)
def test_image_references_need_a_tag_other_than_latest(image: str, problem: str | None) -> None:
    found = image_tag_problem(image)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_latest_tag_is_reported(docs: list[Manifest]) -> None:
    container(find(docs, "StatefulSet", "nats"), "nats")["image"] = "nats:latest"
    assert images_are_pinned(docs) == [
        "StatefulSet/nats: container nats: image 'nats:latest' uses the latest tag"
    ]


def test_deployment_without_disruption_budget_is_reported(docs: list[Manifest]) -> None:
    docs.remove(find(docs, "PodDisruptionBudget", "live-session"))
    assert workloads_have_disruption_budgets(docs) == [
        "Deployment/live-session: no PodDisruptionBudget selects its pods"
    ]


def test_budget_selecting_other_pods_does_not_count(docs: list[Manifest]) -> None:
    budget = find(docs, "PodDisruptionBudget", "outbox")
    budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "out-box"
    assert workloads_have_disruption_budgets(docs) == [
        "Deployment/outbox: no PodDisruptionBudget selects its pods"
    ]


def test_inlined_secret_is_reported(docs: list[Manifest], secrets: frozenset[str]) -> None:
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "snapsell-jwt", "namespace": "snapsell"},
            "stringData": {"SNAPSELL_JWT_SECRET": "not-a-real-secret"},
        }
    )
    assert secrets_are_referenced_not_inlined(secrets)(docs) == [
        "Secret/snapsell-jwt: a Secret is committed; reference it by name"
    ]


def test_undocumented_secret_reference_is_reported(
    docs: list[Manifest], secrets: frozenset[str]
) -> None:
    env = container(find(docs, "Deployment", "gateway"), "gateway")["env"]
    env.append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "mystery", "key": "x"}}})
    assert secrets_are_referenced_not_inlined(secrets)(docs) == [
        "Deployment/gateway: references Secret 'mystery', which docs/OPERATIONS.md does not list"
    ]


def test_secret_references_are_found_in_pods_ingress_and_custom_resources(
    rendered: dict[str, list[Manifest]],
) -> None:
    prod = rendered["prod"]
    assert referenced_secrets(find(prod, "Deployment", "gateway")) == {
        "snapsell-twilio",
        "snapsell-nats-gateway",
        "snapsell-nats-tls",
    }
    assert referenced_secrets(find(prod, "Deployment", "routing")) == {
        "snapsell-nats-routing",
        "snapsell-nats-tls",
        "snapsell-signing-routing",
        "snapsell-db-routing",
        "snapsell-pg-ca",
    }
    assert referenced_secrets(find(prod, "Job", "snapsell-migrate")) == {
        "snapsell-db-migrator",
        "snapsell-pg-ca",
    }
    assert referenced_secrets(find(prod, "Ingress", "gateway")) == {"snapsell-gateway-tls"}
    assert referenced_secrets(find(prod, "ObjectStore", "snapsell-pg-backups")) == {
        "snapsell-pg-backup-s3"
    }
    assert referenced_secrets(find(prod, "Cluster", "snapsell-pg")) == {
        f"snapsell-db-{name}"
        for name in (
            "seller-admin",
            "routing",
            "outbox",
            "live-session",
            "live-catalog",
            "migrator",
        )
    }


def test_every_documented_secret_is_used(
    rendered: dict[str, list[Manifest]], secrets: frozenset[str]
) -> None:
    used = set().union(*(referenced_secrets(doc) for docs in rendered.values() for doc in docs))
    assert secrets == used


def test_missing_autoscaler_is_reported(docs: list[Manifest]) -> None:
    # A HorizontalPodAutoscaler in the base, a KEDA ScaledObject in prod.
    [scaler] = [
        d
        for d in docs
        if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
        and d["spec"]["scaleTargetRef"]["name"] == "outbox"
    ]
    docs.remove(scaler)
    assert scaled_services_have_autoscalers(docs) == ["Deployment/outbox: no autoscaler"]


def test_second_exposed_service_is_reported(docs: list[Manifest]) -> None:
    ingress = find(docs, "Ingress", "gateway")
    path = {"path": "/admin", "pathType": "Prefix"}
    path["backend"] = {"service": {"name": "seller-admin", "port": {"number": 50054}}}
    ingress["spec"]["rules"][0]["http"]["paths"].append(path)
    find(docs, "Service", "nats")["spec"]["type"] = "LoadBalancer"
    assert only_the_gateway_is_exposed(docs) == [
        "Ingress/gateway: exposes Service seller-admin",
        "Service/nats: type LoadBalancer bypasses the Ingress",
    ]


def test_ingress_host_without_tls_is_reported(docs: list[Manifest]) -> None:
    find(docs, "Ingress", "gateway")["spec"]["tls"] = []
    assert only_the_gateway_is_exposed(docs) == [
        "Ingress/gateway: not every host is served over TLS"
    ]


def test_missing_default_deny_is_reported(docs: list[Manifest]) -> None:
    docs.remove(find(docs, "NetworkPolicy", "default-deny-all"))
    assert network_is_default_deny(docs) == [
        "NetworkPolicy: no default deny for Ingress and Egress"
    ]


def test_workload_without_its_own_network_policy_is_reported(docs: list[Manifest]) -> None:
    docs.remove(find(docs, "NetworkPolicy", "nats"))
    assert network_is_default_deny(docs) == [
        "StatefulSet/nats: no NetworkPolicy allows its own flows"
    ]


def test_otlp_sent_to_the_other_protocols_port_is_reported(
    rendered: dict[str, list[Manifest]],
) -> None:
    prod = rendered["prod"]
    gateway = container(find(prod, "Deployment", "gateway"), "gateway")
    # Without its own endpoint, the gateway's OTLP/HTTP would go to the shared gRPC port.
    gateway["env"] = [e for e in gateway["env"] if e["name"] != "OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert otlp_endpoints_match_protocols(prod) == [
        "Deployment/gateway: container gateway: OTLP over http/protobuf goes to port 4318, "
        "not http://otel-collector.monitoring:4317"
    ]


def test_otlp_grpc_sent_to_the_http_port_is_reported(rendered: dict[str, list[Manifest]]) -> None:
    prod = rendered["prod"]
    config = find_generated(prod, "ConfigMap", "snapsell-config-")["data"]
    config["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://otel-collector.monitoring:4318"
    outbox = container(find(prod, "Deployment", "outbox"), "outbox")
    outbox["env"].append({"name": "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "value": "http/json"})
    problems = otlp_endpoints_match_protocols(prod)
    assert "Deployment/outbox: container outbox: unknown OTLP protocol 'http/json'" in problems
    assert (
        "Deployment/routing: container routing: OTLP over grpc goes to port 4317, "
        "not http://otel-collector.monitoring:4318"
    ) in problems
    assert not [p for p in problems if "gateway" in p]  # its own endpoint is on 4318


def test_no_secret_is_committed_anywhere_under_deploy() -> None:
    # Also catches files no kustomization includes yet, and kustomize secret generators.
    offenders = [
        str(path.relative_to(DEPLOY_DIR))
        for path in DEPLOY_DIR.rglob("*")
        if path.is_file()
        and re.search(r"^kind:\s*Secret\s*$|secretGenerator", path.read_text(), re.MULTILINE)
    ]
    assert offenders == []
