"""The policies on who holds what and what is pinned: each catches the defect it is about, on
manifests edited to have it. (Every overlay passing them is in test_deploy_policies.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.deploy.check import secret_holders
from tools.deploy.policy import (
    SecretHolders,
    dockerfile_bases_by_digest,
    grpc_reflection_is_off,
    grpc_traffic_is_mutual_tls,
    migrations_run_in_one_job,
    no_database_superuser,
    pods_hold_only_their_secrets,
    third_party_images_by_digest,
)
from tools.deploy.render import Manifest

from .manifests import container, find, find_generated

DIGEST = "@sha256:" + "a" * 64


@pytest.fixture(scope="module")
def holders() -> SecretHolders:
    return secret_holders()


def secret_env(name: str, secret: str, key: str) -> dict[str, object]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


# --- secrets -------------------------------------------------------------------------------


def test_the_secrets_table_names_each_secrets_pods(holders: SecretHolders) -> None:
    assert holders["snapsell-twilio"] == {"gateway", "outbox"}
    assert holders["snapsell-db-migrator"] == {"snapsell-migrate"}
    assert holders["snapsell-gateway-tls"] == frozenset()


def test_a_secrets_table_without_the_pods_column_is_refused(tmp_path: Path) -> None:
    doc = tmp_path / "OPERATIONS.md"
    doc.write_text("## Secrets\n\n| Secret | Keys |\n|---|---|\n| `snapsell-jwt` | `K` |\n")
    with pytest.raises(ValueError, match="Pods that hold it"):
        secret_holders(doc)


def test_a_service_holding_the_twilio_token_it_does_not_use_is_reported(
    docs: list[Manifest], holders: SecretHolders
) -> None:
    routing = container(find(docs, "Deployment", "routing"), "routing")
    routing["env"].append(secret_env("TWILIO_AUTH_TOKEN", "snapsell-twilio", "TWILIO_AUTH_TOKEN"))
    assert pods_hold_only_their_secrets(holders)(docs) == [
        "Deployment/routing: holds Secret 'snapsell-twilio', "
        "which docs/OPERATIONS.md does not give to routing"
    ]


def test_a_service_mounting_the_migrators_secret_is_reported(
    docs: list[Manifest], holders: SecretHolders
) -> None:
    pod = find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    pod["volumes"].append({"name": "m", "secret": {"secretName": "snapsell-db-migrator"}})
    assert pods_hold_only_their_secrets(holders)(docs) == [
        "Deployment/gateway: holds Secret 'snapsell-db-migrator', "
        "which docs/OPERATIONS.md does not give to gateway"
    ]


# --- database superuser and migrations ------------------------------------------------------


def test_superuser_access_is_reported(docs: list[Manifest]) -> None:
    find(docs, "Cluster", "snapsell-pg")["spec"]["enableSuperuserAccess"] = True
    assert no_database_superuser(docs) == [
        "Cluster/snapsell-pg: enableSuperuserAccess is not false"
    ]


def test_a_service_pod_with_the_admin_dsn_or_the_superuser_is_reported(
    docs: list[Manifest],
) -> None:
    outbox = find(docs, "Deployment", "outbox")
    pod = outbox["spec"]["template"]["spec"]
    pod["initContainers"] = [
        {
            **container(outbox, "outbox"),
            "name": "migrate",
            "env": [
                secret_env("PG_ADMIN_USER", "snapsell-pg-superuser", "username"),
                {"name": "DATABASE_URL", "value": "postgresql://$(PG_ADMIN_USER)@pg/snapsell"},
            ],
        }
    ]
    assert no_database_superuser(docs) == [
        "Deployment/outbox: holds the superuser Secret 'snapsell-pg-superuser'",
        "Deployment/outbox: initContainer migrate: gets the admin DATABASE_URL "
        "(only the migrations Job may)",
    ]


def test_a_deployment_migrating_in_an_init_container_is_reported(docs: list[Manifest]) -> None:
    routing = find(docs, "Deployment", "routing")
    migrate = {**container(routing, "routing"), "name": "migrate"}
    migrate["command"] = ["python", "-m", "services.routing", "migrate"]
    routing["spec"]["template"]["spec"]["initContainers"] = [migrate]
    assert migrations_run_in_one_job(docs) == [
        "Deployment/routing: initContainer migrate: runs migrations (the migrations Job does)"
    ]


def test_a_missing_migrations_job_is_reported(docs: list[Manifest]) -> None:
    docs.remove(find(docs, "Job", "snapsell-migrate"))
    assert migrations_run_in_one_job(docs) == [
        "Job: 0 migrations Jobs (one per release is expected)"
    ]


def test_a_service_left_out_of_the_migrations_job_is_reported(docs: list[Manifest]) -> None:
    spec = find(docs, "Job", "snapsell-migrate")["spec"]["template"]["spec"]
    spec["containers"] = [c for c in spec["containers"] if c["name"] != "outbox"]
    assert migrations_run_in_one_job(docs) == [
        "Job/snapsell-migrate: does not run services.outbox migrate"
    ]


def test_a_migrations_container_without_the_admin_dsn_is_reported(docs: list[Manifest]) -> None:
    migrate = container(find(docs, "Job", "snapsell-migrate"), "routing")
    migrate["env"] = [e for e in migrate["env"] if e["name"] != "DATABASE_URL"]
    assert migrations_run_in_one_job(docs) == [
        "Job/snapsell-migrate: container routing: no DATABASE_URL (the migrator's DSN)"
    ]


# --- images ----------------------------------------------------------------------------------


def test_third_party_images_by_tag_are_reported_and_ours_are_not(docs: list[Manifest]) -> None:
    container(find(docs, "StatefulSet", "nats"), "nats")["image"] = "nats:2.15.1-alpine"
    cluster = find(docs, "Cluster", "snapsell-pg")["spec"]
    cluster["imageName"] = "ghcr.io/cloudnative-pg/postgresql:18.6-standard-trixie"
    assert third_party_images_by_digest(docs) == [
        "StatefulSet/nats: container nats: image 'nats:2.15.1-alpine' is not pinned by digest",
        "Cluster/snapsell-pg: PostgreSQL image is not pinned by digest",
    ]


def test_postgresql_from_an_image_catalog_is_reported(docs: list[Manifest]) -> None:
    cluster = find(docs, "Cluster", "snapsell-pg")["spec"]
    del cluster["imageName"]
    cluster["imageCatalogRef"] = {"kind": "ClusterImageCatalog", "name": "postgresql", "major": 18}
    assert third_party_images_by_digest(docs) == [
        "Cluster/snapsell-pg: PostgreSQL image is not pinned by digest"
    ]


def test_dockerfile_bases_must_be_pinned_by_digest() -> None:
    dockerfile = (
        "ARG PYTHON_IMAGE=python:3.11-slim\n"
        f"ARG OTHER_IMAGE=busybox:1.37{DIGEST}\n"
        "FROM ${PYTHON_IMAGE} AS builder\n"
        "FROM --platform=$BUILDPLATFORM golang:1.25 AS tools\n"
        f"FROM alpine:3.22{DIGEST}\n"
    )
    assert dockerfile_bases_by_digest(dockerfile) == [
        "Dockerfile: base image 'python:3.11-slim' is not pinned by digest",
        "Dockerfile: base image 'golang:1.25' is not pinned by digest",
    ]


# --- production: reflection and mTLS --------------------------------------------------------


def test_reflection_left_on_in_prod_is_reported(rendered: dict[str, list[Manifest]]) -> None:
    prod = rendered["prod"]
    del find_generated(prod, "ConfigMap", "snapsell-config-")["data"]["GRPC_REFLECTION"]
    assert grpc_reflection_is_off(prod) == [
        f"Deployment/{name}: container {name}: GRPC_REFLECTION is not false"
        for name in ("live-catalog", "live-session", "outbox", "routing", "seller-admin")
    ]


def test_a_container_turning_reflection_back_on_is_reported(
    rendered: dict[str, list[Manifest]],
) -> None:
    prod = rendered["prod"]
    outbox = container(find(prod, "Deployment", "outbox"), "outbox")
    outbox["env"].append({"name": "GRPC_REFLECTION", "value": "true"})
    assert grpc_reflection_is_off(prod) == [
        "Deployment/outbox: container outbox: GRPC_REFLECTION is not false"
    ]


def test_a_grpc_service_outside_the_mesh_is_reported(rendered: dict[str, list[Manifest]]) -> None:
    prod = rendered["prod"]
    labels = find(prod, "Deployment", "routing")["spec"]["template"]["metadata"]["labels"]
    del labels["sidecar.istio.io/inject"]
    assert grpc_traffic_is_mutual_tls(prod) == [
        "Deployment/routing: pods are not in the mesh (sidecar.istio.io/inject)"
    ]


@pytest.mark.parametrize(
    "weaken",
    [
        lambda spec: spec["mtls"].update(mode="PERMISSIVE"),
        lambda spec: spec["portLevelMtls"].update({"50052": {"mode": "DISABLE"}}),
        lambda spec: spec["selector"]["matchLabels"].update({"app.kubernetes.io/name": "out"}),
    ],
    ids=["permissive", "grpc-port-exempt", "selects-other-pods"],
)
def test_a_grpc_port_not_requiring_mtls_is_reported(
    rendered: dict[str, list[Manifest]], weaken: object
) -> None:
    prod = rendered["prod"]
    weaken(find(prod, "PeerAuthentication", "outbox")["spec"])  # type: ignore[operator]
    assert grpc_traffic_is_mutual_tls(prod) == [
        "Deployment/outbox: no STRICT PeerAuthentication requires mTLS on its gRPC port"
    ]
