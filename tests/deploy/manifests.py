"""Lookups in rendered manifests, for the deploy tests."""

from __future__ import annotations

from collections.abc import Sequence

from tools.deploy.render import Manifest


def find(docs: Sequence[Manifest], kind: str, name: str) -> Manifest:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def find_generated(docs: Sequence[Manifest], kind: str, prefix: str) -> Manifest:
    """A kustomize-generated object, whose name carries a content-hash suffix."""
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    assert len(matches) == 1, f"{kind}/{prefix}*: {len(matches)} found"
    return matches[0]


def of_kind(docs: Sequence[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def container(deployment: Manifest, name: str, init: bool = False) -> Manifest:
    key = "initContainers" if init else "containers"
    spec = deployment["spec"]["template"]["spec"]
    matches = [c for c in spec.get(key, []) if c["name"] == name]
    assert len(matches) == 1, f"{deployment['metadata']['name']}: {key} {name}"
    return matches[0]
