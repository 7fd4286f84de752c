"""Production scales routing, live-catalog and the outbox on work waiting (KEDA ScaledObjects,
validated against KEDA's own CRD schema), not on CPU; the gateway keeps its CPU autoscaler."""

from __future__ import annotations

import copy

from services.live_catalog.consumer import ROUTED_DURABLE, SESSIONS_DURABLE
from services.routing.consumer import INBOUND_DURABLE
from tests.deploy.conftest import Rendered
from tests.deploy.manifests import find, of_kind
from tests.deploy.netpol import Endpoint, allowed
from tools.deploy.layout import KUBERNETES_VERSION
from tools.deploy.policy import (
    QUEUE_SCALED,
    consumers_scale_on_work_waiting,
    scaled_services_have_autoscalers,
)
from tools.deploy.render import Manifest
from tools.deploy.schema import crd_schemas, is_custom, validate_schemas


def _triggers(doc: Manifest, kind: str) -> list[dict[str, str]]:
    return [t["metadata"] for t in doc["spec"]["triggers"] if t["type"] == kind]


def test_queue_workers_scale_on_their_backlog_through_keda_alone(rendered: Rendered) -> None:
    prod = rendered["prod"]
    scaled = {doc["spec"]["scaleTargetRef"]["name"] for doc in of_kind(prod, "ScaledObject")}
    assert scaled == QUEUE_SCALED == {"routing", "live-catalog", "outbox"}
    cpu_scaled = {
        d["spec"]["scaleTargetRef"]["name"] for d in of_kind(prod, "HorizontalPodAutoscaler")
    }
    assert cpu_scaled == {"gateway"}
    assert "replicas" not in find(prod, "Deployment", "live-catalog")["spec"]
    assert scaled_services_have_autoscalers(prod) == []
    assert consumers_scale_on_work_waiting(prod) == []
    assert not of_kind(rendered["local"], "ScaledObject")


def test_jetstream_triggers_name_the_consumers_the_services_create(rendered: Rendered) -> None:
    prod = rendered["prod"]
    routing = _triggers(find(prod, "ScaledObject", "routing"), "nats-jetstream")
    catalog = _triggers(find(prod, "ScaledObject", "live-catalog"), "nats-jetstream")
    assert [(t["stream"], t["consumer"]) for t in routing] == [("INBOUND", INBOUND_DURABLE)]
    assert [(t["stream"], t["consumer"]) for t in catalog] == [
        ("ROUTING_EVENTS", ROUTED_DURABLE),
        ("LIVE_SESSION_EVENTS", SESSIONS_DURABLE),
    ]
    for trigger in routing + catalog:
        # Every server through the headless Service (KEDA asks the consumer's leader), in the
        # global account: the NATS configuration defines no accounts.
        assert trigger["natsServerMonitoringEndpoint"].startswith("nats-headless.snapsell.svc")
        assert trigger["natsServerMonitoringEndpoint"].endswith(":8222")
        assert trigger["account"] == "$G"
        assert int(trigger["lagThreshold"]) > 0


def test_outbox_counts_due_messages_with_the_outbox_roles_secret(rendered: Rendered) -> None:
    prod = rendered["prod"]
    outbox = find(prod, "ScaledObject", "outbox")
    [trigger] = outbox["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert "FROM outbox.messages" in trigger["metadata"]["query"]
    auth = find(prod, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "userName": ("snapsell-db-outbox", "username"),
        "password": ("snapsell-db-outbox", "password"),
    }


def test_keda_objects_are_validated_against_the_vendored_crd_not_skipped(
    rendered: Rendered,
) -> None:
    keda = [d for d in rendered["prod"] if d["apiVersion"] == "keda.sh/v1alpha1"]
    assert {d["kind"] for d in keda} == {"ScaledObject", "TriggerAuthentication"}
    assert {
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("keda.sh/v1alpha1", "TriggerAuthentication"),
    } <= set(crd_schemas())
    assert not any(is_custom(d) for d in keda)
    report = validate_schemas(keda, KUBERNETES_VERSION)
    assert (report.problems, report.validated, report.skipped) == ((), len(keda), ())


def test_keda_schema_refuses_unknown_fields_wrong_types_and_missing_triggers(
    rendered: Rendered,
) -> None:
    routing = find(rendered["prod"], "ScaledObject", "routing")
    misspelt, wrong_type, no_triggers = (copy.deepcopy(routing) for _ in range(3))
    misspelt["spec"]["maxReplicas"] = misspelt["spec"].pop("maxReplicaCount")
    wrong_type["spec"]["minReplicaCount"] = "two"
    del no_triggers["spec"]["triggers"]
    auth = find(rendered["prod"], "TriggerAuthentication", "outbox-backlog")
    auth["spec"]["secretTargetRef"][0]["secret"] = auth["spec"]["secretTargetRef"][0].pop("name")
    report = validate_schemas([misspelt, wrong_type, no_triggers, auth], KUBERNETES_VERSION)
    assert report.validated == 0
    assert len(report.problems) == 5, report.problems
    assert (
        "spec: Additional properties are not allowed ('maxReplicas' was unexpected)"
        in report.problems[0]
    )
    assert "spec.minReplicaCount: 'two' is not of type 'integer'" in report.problems[1]
    assert "spec: 'triggers' is a required property" in report.problems[2]
    assert all(
        p.startswith("TriggerAuthentication/outbox-backlog: spec.secretTargetRef.0")
        for p in report.problems[3:]
    )


def test_two_autoscalers_or_a_cpu_trigger_for_a_queue_worker_are_reported(
    rendered: Rendered,
) -> None:
    prod = rendered["prod"]
    base_routing_hpa = find(rendered["local"], "HorizontalPodAutoscaler", "routing")
    prod.append(base_routing_hpa)
    find(prod, "Deployment", "outbox")["spec"]["replicas"] = 3
    find(prod, "ScaledObject", "live-catalog")["spec"]["triggers"].append(
        {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}}
    )
    assert scaled_services_have_autoscalers(prod) == [
        "Deployment/outbox: sets replicas, which ScaledObject/outbox owns",
        "Deployment/routing: scaled by ScaledObject/routing and HorizontalPodAutoscaler/routing",
    ]
    assert consumers_scale_on_work_waiting(prod) == [
        "ScaledObject/live-catalog: trigger cpu is not work waiting"
    ]


def test_keda_reaches_the_nats_monitoring_port_and_postgres_in_prod_only(
    rendered: Rendered,
) -> None:
    keda = Endpoint(labels={"app.kubernetes.io/name": "keda-operator"}, namespace="keda")
    nats = Endpoint(labels={"app.kubernetes.io/name": "nats"})
    postgres = Endpoint(
        labels={"cnpg.io/cluster": "snapsell-pg", "cnpg.io/instanceRole": "replica"}
    )
    assert allowed(rendered["prod"], keda, nats, 8222)
    assert allowed(rendered["prod"], keda, postgres, 5432)
    assert not allowed(rendered["prod"], keda, nats, 4222)
    assert not allowed(rendered["local"], keda, nats, 8222)
    assert not allowed(rendered["local"], keda, postgres, 5432)
