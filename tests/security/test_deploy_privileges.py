"""What the production manifests hand to each pod, read as an attacker who got code execution
in one service's pod would: no database superuser or admin DSN anywhere but the release's
migrations Job, the Twilio token only where it is used, reflection off, gRPC ports that refuse
plaintext, and no image that a moved tag could swap."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tools.deploy.layout import overlay_dir
from tools.deploy.render import Manifest, parse, render

GRPC_SERVICES = ("routing", "outbox", "live-session", "seller-admin", "live-catalog")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def prod() -> list[Manifest]:
    return parse(render(overlay_dir("prod")))


def find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_containers(doc: Manifest) -> Iterator[Mapping[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def secrets_of(doc: Manifest) -> set[str]:
    spec = doc["spec"]["template"]["spec"]
    found = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    for c in pod_containers(doc):
        for entry in c.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                found.add(ref["name"])
    return found


def test_no_service_pod_gets_a_database_admin(prod: list[Manifest]) -> None:
    assert find(prod, "Cluster", "snapsell-pg")["spec"]["enableSuperuserAccess"] is False
    for deployment in (d for d in prod if d["kind"] == "Deployment"):
        name = deployment["metadata"]["name"]
        assert not {"snapsell-pg-superuser", "snapsell-db-migrator"} & secrets_of(deployment), name
        for c in pod_containers(deployment):
            assert "DATABASE_URL" not in {e["name"] for e in c.get("env", [])}, name


def test_migrations_run_in_one_job_as_the_migrator(prod: list[Manifest]) -> None:
    job = find(prod, "Job", "snapsell-migrate")
    assert secrets_of(job) == {"snapsell-db-migrator", "snapsell-pg-ca"}
    commands = {tuple(c["command"]) for c in pod_containers(job)}
    modules = {name.replace("-", "_") for name in GRPC_SERVICES}
    assert commands == {("python", "-m", f"services.{m}", "migrate") for m in modules}


def test_only_the_gateway_and_the_outbox_hold_the_twilio_token(prod: list[Manifest]) -> None:
    holders = {
        d["metadata"]["name"]
        for d in prod
        if d["kind"] in ("Deployment", "StatefulSet", "Job") and "snapsell-twilio" in secrets_of(d)
    }
    assert holders == {"gateway", "outbox"}


def test_grpc_servers_hide_reflection_and_refuse_plaintext(prod: list[Manifest]) -> None:
    config = next(d for d in prod if d["metadata"]["name"].startswith("snapsell-config-"))
    assert config["data"]["GRPC_REFLECTION"] == "false"
    for name in GRPC_SERVICES:
        template = find(prod, "Deployment", name)["spec"]["template"]
        assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "true", name
        policy = find(prod, "PeerAuthentication", name)["spec"]
        assert policy["mtls"]["mode"] == "STRICT", name
        assert policy["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}


def test_third_party_images_are_pinned_by_digest(prod: list[Manifest]) -> None:
    assert DIGEST.search(
        find(prod, "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    assert DIGEST.search(find(prod, "Cluster", "snapsell-pg")["spec"].get("imageName", ""))
