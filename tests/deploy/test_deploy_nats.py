"""The deployed NATS configuration: authorization from infra/nats_users.py in every overlay,
each service with its own user only, TLS in prod (test_deploy_stores.py loads the rendered
configuration into nats-server)."""

from __future__ import annotations

from pathlib import Path

from tools.deploy.policy import nats_requires_authorization, nats_uses_tls, rules
from tools.deploy.render import Manifest

from .manifests import container, find, find_generated
from .nats import check_nats_config


def test_nats_authorization_holds_for_every_overlay(docs: list[Manifest]) -> None:
    assert nats_requires_authorization(docs) == []


def test_prod_reaches_nats_over_tls_and_local_is_told_apart(rendered) -> None:
    assert "nats tls" in rules(frozenset(), production=True)
    assert "nats tls" not in rules(frozenset())
    assert nats_uses_tls(rendered["prod"]) == []
    assert len(nats_uses_tls(rendered["local"])) == 2  # no tls block, a nats:// URL


def test_authorization_drifting_from_the_table_is_reported(docs: list[Manifest]) -> None:
    config = find_generated(docs, "ConfigMap", "nats-config")["data"]
    config["authorization.conf"] = config["authorization.conf"].replace(
        '"gateway.v1.>"', '"gateway.v1.>", "outbox.v1.>"'
    )
    assert nats_requires_authorization(docs) == [
        "ConfigMap/nats-config: authorization.conf differs from infra/nats_users.py "
        "(python -m infra.nats_users > deploy/base/nats/authorization.conf)"
    ]


def test_a_server_without_authorization_is_reported(docs: list[Manifest]) -> None:
    config = find_generated(docs, "ConfigMap", "nats-config")["data"]
    config["nats.conf"] = config["nats.conf"].replace(
        "include ./authorization.conf", "# include ./authorization.conf"
    )
    assert nats_requires_authorization(docs) == [
        "ConfigMap/nats-config: nats.conf does not include ./authorization.conf"
    ]


def test_a_service_with_another_users_password_is_reported(docs: list[Manifest]) -> None:
    gateway = container(find(docs, "Deployment", "gateway"), "gateway")
    password = next(e for e in gateway["env"] if e["name"] == "NATS_PASSWORD")
    password["valueFrom"]["secretKeyRef"]["name"] = "snapsell-nats-routing"
    assert nats_requires_authorization(docs) == [
        "Deployment/gateway: does not connect to NATS as user gateway",
        "Deployment/gateway: holds another NATS user's Secret snapsell-nats-routing",
    ]


def test_a_missing_server_password_is_reported(docs: list[Manifest]) -> None:
    nats = container(find(docs, "StatefulSet", "nats"), "nats")
    nats["env"] = [e for e in nats["env"] if e["name"] != "NATS_PASSWORD_OUTBOX"]
    assert nats_requires_authorization(docs) == [
        "StatefulSet/nats: NATS_PASSWORD_OUTBOX not from snapsell-nats-outbox"
    ]


def test_a_password_the_statefulset_does_not_give_fails_the_load(
    docs: list[Manifest], tmp_path: Path
) -> None:
    nats = container(find(docs, "StatefulSet", "nats"), "nats")
    nats["env"] = [e for e in nats["env"] if e["name"] != "NATS_PASSWORD_ROUTING"]
    result = check_nats_config(docs, tmp_path)
    assert result.returncode != 0
    assert "NATS_PASSWORD_ROUTING" in result.stderr
