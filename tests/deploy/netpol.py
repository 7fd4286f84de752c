"""A small evaluator of Kubernetes NetworkPolicy semantics, enough to test the flows the
manifests allow: a connection passes when the source's egress and the destination's ingress
both allow it (a pod selected by no policy of a direction is open in that direction)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tools.deploy.policy import selector_matches
from tools.deploy.render import Manifest

Labels = Mapping[str, str]


@dataclass(frozen=True)
class Endpoint:
    """A pod (labels + its namespace's labels) or, with `ip`, an address outside the cluster."""

    labels: Labels = field(default_factory=dict)
    namespace: str = "snapsell"
    namespace_labels: Labels = field(default_factory=dict)
    ip: str | None = None

    @property
    def all_namespace_labels(self) -> Labels:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def _peer_matches(peer: Mapping[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if other.ip is None:
            return False
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        if address not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(address in ipaddress.ip_network(e) for e in block.get("except", []))
    if other.ip is not None:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], other.all_namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selector_matches(peer["podSelector"], other.labels)


def _port_matches(ports: Sequence[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(
        p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports
    )


def _allows(
    policies: Sequence[Manifest],
    direction: str,
    subject: Endpoint,
    other: Endpoint,
    port: int,
    protocol: str,
) -> bool:
    kind = "Ingress" if direction == "ingress" else "Egress"
    peers_key = "from" if direction == "ingress" else "to"
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace") == subject.namespace
        and kind in p["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(p["spec"].get("podSelector") or {}, subject.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(direction, []) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(
                _peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers
            )
            if peer_ok and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def allowed(
    docs: Sequence[Manifest],
    source: Endpoint,
    destination: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    egress_ok = source.ip is not None or _allows(
        policies, "egress", source, destination, port, protocol
    )
    ingress_ok = destination.ip is not None or _allows(
        policies, "ingress", destination, source, port, protocol
    )
    return egress_ok and ingress_ok
