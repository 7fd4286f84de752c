"""`make deploy-check` fails when the gateway does not name the proxies whose X-Forwarded-For
it trusts: behind the ingress, the per-source limits would count every client as one."""

from __future__ import annotations

import pytest

from tools.deploy.policy import gateway_trusts_only_its_proxies
from tools.deploy.render import Manifest

from .manifests import container, find


def gateway_env(docs: list[Manifest]) -> list[dict[str, str]]:
    return container(find(docs, "Deployment", "gateway"), "gateway")["env"]


def test_every_overlay_sets_the_trusted_proxy_range(docs: list[Manifest]) -> None:
    [value] = [e["value"] for e in gateway_env(docs) if e["name"] == "GATEWAY_FORWARDED_ALLOW_IPS"]
    assert value and "*" not in value
    assert gateway_trusts_only_its_proxies(docs) == []


def test_gateway_without_trusted_proxies_is_reported(docs: list[Manifest]) -> None:
    env = gateway_env(docs)
    env[:] = [e for e in env if e["name"] != "GATEWAY_FORWARDED_ALLOW_IPS"]
    assert gateway_trusts_only_its_proxies(docs) == [
        "Deployment/gateway: container gateway: no trusted proxies (GATEWAY_FORWARDED_ALLOW_IPS)"
    ]


@pytest.mark.parametrize("value", ["*", "10.0.0.0/8,*", "ingress-nginx"])
def test_gateway_trusting_any_proxy_or_a_name_is_reported(docs: list[Manifest], value: str) -> None:
    for entry in gateway_env(docs):
        if entry["name"] == "GATEWAY_FORWARDED_ALLOW_IPS":
            entry["value"] = value
    [problem] = gateway_trusts_only_its_proxies(docs)
    assert problem.startswith("Deployment/gateway: container gateway: GATEWAY_FORWARDED_ALLOW_IPS")
