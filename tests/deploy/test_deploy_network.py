"""The NetworkPolicies allow exactly the flows of ARCHITECTURE.md: each flow is checked
through both the source's egress and the destination's ingress rules."""

from __future__ import annotations

import pytest

from tools.deploy.render import Manifest

from .netpol import Endpoint, allowed


def pod(name: str) -> Endpoint:
    component = {"nats": "messaging"}.get(name, "service")
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component}
    if name in ("routing", "outbox", "live-session", "seller-admin"):
        labels["snapsell.io/database-client"] = "true"
    return Endpoint(labels=labels, namespace_labels={"snapsell.io/grpc-clients": "true"})


POSTGRES = Endpoint(labels={"cnpg.io/cluster": "snapsell-pg", "cnpg.io/instanceRole": "primary"})
INGRESS_CONTROLLER = Endpoint(
    labels={"app.kubernetes.io/name": "ingress-nginx"}, namespace="ingress-nginx"
)
PROMETHEUS = Endpoint(labels={"app.kubernetes.io/name": "prometheus"}, namespace="monitoring")
DNS = Endpoint(labels={"k8s-app": "kube-dns"}, namespace="kube-system")
CNPG_OPERATOR = Endpoint(
    labels={"app.kubernetes.io/name": "cloudnative-pg"}, namespace="cnpg-system"
)
DASHBOARD = Endpoint(
    labels={"app": "dashboard", "snapsell.io/grpc-client": "true"},
    namespace="dashboard",
    namespace_labels={"snapsell.io/grpc-clients": "true"},
)
UNLABELLED_POD = Endpoint(labels={"app": "debug"}, namespace="default")
TWILIO = Endpoint(ip="54.172.60.1")
PRIVATE_HOST = Endpoint(ip="10.20.30.40")

ALLOWED = [
    (INGRESS_CONTROLLER, pod("gateway"), 8080),
    (PROMETHEUS, pod("gateway"), 8080),
    (pod("gateway"), pod("nats"), 4222),
    (pod("routing"), pod("nats"), 4222),
    (pod("routing"), POSTGRES, 5432),
    (pod("routing"), pod("seller-admin"), 50054),
    (pod("routing"), pod("live-session"), 50053),
    (pod("routing"), pod("outbox"), 50052),
    (pod("outbox"), pod("nats"), 4222),
    (pod("outbox"), POSTGRES, 5432),
    (pod("outbox"), pod("routing"), 50051),
    (pod("outbox"), TWILIO, 443),
    # The channel directory: which senders each tenant may send from.
    (pod("outbox"), pod("seller-admin"), 50054),
    (pod("seller-admin"), POSTGRES, 5432),
    (pod("seller-admin"), pod("nats"), 4222),
    (pod("live-session"), POSTGRES, 5432),
    (pod("live-session"), pod("nats"), 4222),
    (DASHBOARD, pod("seller-admin"), 50054),
    (DASHBOARD, pod("routing"), 50051),
    (DASHBOARD, pod("live-session"), 50053),
    (DASHBOARD, pod("outbox"), 50052),
    (PROMETHEUS, pod("routing"), 9101),
    (PROMETHEUS, pod("outbox"), 9102),
    (PROMETHEUS, pod("live-session"), 9103),
    (PROMETHEUS, pod("seller-admin"), 9104),
    (pod("nats"), pod("nats"), 6222),
    (CNPG_OPERATOR, POSTGRES, 8000),
    (POSTGRES, POSTGRES, 5432),
]

DENIED = [
    (UNLABELLED_POD, pod("gateway"), 8080),
    (INGRESS_CONTROLLER, pod("routing"), 50051),
    (INGRESS_CONTROLLER, pod("nats"), 4222),
    (pod("gateway"), POSTGRES, 5432),
    (pod("gateway"), pod("routing"), 50051),
    (pod("gateway"), TWILIO, 443),
    (pod("routing"), TWILIO, 443),
    (pod("outbox"), PRIVATE_HOST, 443),
    (pod("live-session"), pod("outbox"), 50052),
    (pod("seller-admin"), pod("routing"), 50051),
    (pod("nats"), POSTGRES, 5432),
    (UNLABELLED_POD, pod("seller-admin"), 50054),
    (UNLABELLED_POD, pod("nats"), 4222),
    (UNLABELLED_POD, POSTGRES, 5432),
    (DASHBOARD, POSTGRES, 5432),
    (DASHBOARD, pod("nats"), 4222),
    (PROMETHEUS, pod("routing"), 50051),
]


def _name(endpoint: Endpoint) -> str:
    return endpoint.ip or endpoint.labels.get("app.kubernetes.io/name") or str(endpoint.labels)


@pytest.mark.parametrize(
    ("source", "destination", "port"),
    ALLOWED,
    ids=[f"{_name(s)}->{_name(d)}:{p}" for s, d, p in ALLOWED],
)
def test_architecture_flow_is_allowed(
    docs: list[Manifest], source: Endpoint, destination: Endpoint, port: int
) -> None:
    assert allowed(docs, source, destination, port)


@pytest.mark.parametrize(
    ("source", "destination", "port"),
    DENIED,
    ids=[f"{_name(s)}->{_name(d)}:{p}" for s, d, p in DENIED],
)
def test_other_flows_are_denied(
    docs: list[Manifest], source: Endpoint, destination: Endpoint, port: int
) -> None:
    assert not allowed(docs, source, destination, port)


@pytest.mark.parametrize(
    "name", ["gateway", "routing", "outbox", "live-session", "seller-admin", "nats"]
)
def test_every_pod_resolves_names(docs: list[Manifest], name: str) -> None:
    assert allowed(docs, pod(name), DNS, 53, "UDP")
    assert allowed(docs, pod(name), DNS, 53, "TCP")


def test_without_the_policies_everything_would_flow(docs: list[Manifest]) -> None:
    # The evaluator itself: no NetworkPolicy means an open namespace.
    open_docs = [d for d in docs if d["kind"] != "NetworkPolicy"]
    assert allowed(open_docs, pod("gateway"), POSTGRES, 5432)
