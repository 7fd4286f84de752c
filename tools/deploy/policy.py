"""Deployment policies, checked on rendered manifests without a cluster.

Each rule takes every document of one rendered overlay and returns one line per violation,
naming the object and what is wrong. `make deploy-check` fails on any line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from infra.nats_users import ADMIN_USER, SERVICE_USERS, password_variable, render_authorization
from tools.deploy.render import Manifest, describe

Rule = Callable[[Sequence[Manifest]], list[str]]

# Kinds that run pods continuously, and therefore need probes and disruption budgets.
LONG_RUNNING_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"})
# Deployments that must scale horizontally (ARCHITECTURE.md: gateway and outbox scale out,
# routing's consumer is safe with N replicas).
AUTOSCALED = frozenset({"gateway", "routing", "outbox"})
INGRESS_SERVICES = frozenset({"gateway"})

_SECRETISH_KEY = re.compile(r"secret", re.IGNORECASE)
_CREDENTIAL_BLOCKS = frozenset({"s3Credentials", "azureCredentials", "googleCredentials"})


# --- helpers -----------------------------------------------------------------------------


def pod_spec(doc: Manifest) -> Mapping[str, Any] | None:
    if doc.get("kind") in LONG_RUNNING_KINDS or doc.get("kind") == "Job":
        return doc.get("spec", {}).get("template", {}).get("spec")
    if doc.get("kind") == "CronJob":
        job = doc.get("spec", {}).get("jobTemplate", {}).get("spec", {})
        return job.get("template", {}).get("spec")
    return None


def pod_labels(doc: Manifest) -> Mapping[str, str]:
    template = doc.get("spec", {}).get("template", {})
    return template.get("metadata", {}).get("labels", {}) or {}


def containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(kind, container) for init and regular containers."""
    for container in spec.get("initContainers", []) or []:
        yield "initContainer", container
    for container in spec.get("containers", []) or []:
        yield "container", container


def workloads(docs: Sequence[Manifest]) -> Iterator[tuple[Manifest, Mapping[str, Any]]]:
    for doc in docs:
        spec = pod_spec(doc)
        if spec is not None:
            yield doc, spec


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label set."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def image_tag_problem(image: str) -> str | None:
    """Why IMAGE is not pinned, or None: it needs an explicit tag other than latest (or a
    digest)."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag"
    if last.rsplit(":", 1)[1] == "latest":
        return f"image {image!r} uses the latest tag"
    return None


def referenced_secrets(node: Any) -> set[str]:
    """Names of Secrets a manifest refers to: env/envFrom/volumes/imagePullSecrets of pods,
    Ingress TLS, and custom resources' `*Secret*: {name}` and credential blocks."""
    found: set[str] = set()
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "secretName" and isinstance(value, str):
                found.add(value)
            elif key == "imagePullSecrets" and isinstance(value, list):
                found.update(str(item["name"]) for item in value if "name" in item)
            elif isinstance(value, Mapping) and _SECRETISH_KEY.search(str(key)):
                if isinstance(value.get("name"), str):
                    found.add(value["name"])
            elif key in _CREDENTIAL_BLOCKS and isinstance(value, Mapping):
                for ref in value.values():
                    if isinstance(ref, Mapping) and isinstance(ref.get("name"), str):
                        found.add(ref["name"])
            found |= referenced_secrets(value)
    elif isinstance(node, list):
        for item in node:
            found |= referenced_secrets(item)
    return found


# --- rules -------------------------------------------------------------------------------


def containers_have_probes(docs: Sequence[Manifest]) -> list[str]:
    problems = []
    for doc, spec in workloads(docs):
        if doc["kind"] not in LONG_RUNNING_KINDS:
            continue  # Jobs run to completion
        for kind, container in containers(spec):
            if kind != "container":
                continue  # init containers run to completion; Kubernetes rejects probes there
            for probe in ("livenessProbe", "readinessProbe"):
                if not container.get(probe):
                    problems.append(f"{describe(doc)}: container {container['name']}: no {probe}")
    return problems


def containers_have_resources(docs: Sequence[Manifest]) -> list[str]:
    problems = []
    for doc, spec in workloads(docs):
        for kind, container in containers(spec):
            resources = container.get("resources") or {}
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if not (resources.get(section) or {}).get(resource):
                        problems.append(
                            f"{describe(doc)}: {kind} {container['name']}: "
                            f"no resources.{section}.{resource}"
                        )
    return problems


def containers_are_locked_down(docs: Sequence[Manifest]) -> list[str]:
    problems = []
    for doc, spec in workloads(docs):
        pod_context = spec.get("securityContext") or {}
        pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
        for kind, container in containers(spec):
            where = f"{describe(doc)}: {kind} {container['name']}"
            context = container.get("securityContext") or {}
            non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
            if non_root is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
                problems.append(f"{where}: runs as uid 0")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if context.get("privileged"):
                problems.append(f"{where}: privileged")
            if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            seccomp = (context.get("seccompProfile") or {}).get("type", pod_seccomp)
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: no RuntimeDefault seccomp profile")
    return problems


def images_are_pinned(docs: Sequence[Manifest]) -> list[str]:
    problems = []
    for doc, spec in workloads(docs):
        for kind, container in containers(spec):
            problem = image_tag_problem(str(container.get("image", "")))
            if problem:
                problems.append(f"{describe(doc)}: {kind} {container['name']}: {problem}")
    return problems


def workloads_have_disruption_budgets(docs: Sequence[Manifest]) -> list[str]:
    budgets = [doc for doc in docs if doc.get("kind") == "PodDisruptionBudget"]
    problems = []
    for doc, _spec in workloads(docs):
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        namespace = doc["metadata"].get("namespace")
        labels = pod_labels(doc)
        if not any(
            budget["metadata"].get("namespace") == namespace
            and selector_matches(budget["spec"].get("selector") or {}, labels)
            for budget in budgets
        ):
            problems.append(f"{describe(doc)}: no PodDisruptionBudget selects its pods")
    return problems


def secrets_are_referenced_not_inlined(documented: frozenset[str]) -> Rule:
    """Secrets are created out of band (docs/OPERATIONS.md lists them): none may be rendered,
    and every one referenced must be a documented name."""

    def rule(docs: Sequence[Manifest]) -> list[str]:
        problems = []
        for doc in docs:
            if doc.get("kind") == "Secret":
                problems.append(f"{describe(doc)}: a Secret is committed; reference it by name")
                continue
            for name in sorted(referenced_secrets(doc) - documented):
                problems.append(
                    f"{describe(doc)}: references Secret {name!r}, "
                    "which docs/OPERATIONS.md does not list"
                )
        return problems

    return rule


def scaled_services_have_autoscalers(docs: Sequence[Manifest]) -> list[str]:
    deployments = {d["metadata"]["name"] for d in docs if d.get("kind") == "Deployment"}
    targets: dict[str, Manifest] = {}
    problems = []
    for doc in docs:
        if doc.get("kind") != "HorizontalPodAutoscaler":
            continue
        spec = doc["spec"]
        target = spec["scaleTargetRef"]
        if target.get("kind") != "Deployment" or target.get("name") not in deployments:
            problems.append(f"{describe(doc)}: scales {target.get('kind')}/{target.get('name')}")
            continue
        targets[target["name"]] = doc
        if spec.get("minReplicas", 1) > spec["maxReplicas"]:
            problems.append(f"{describe(doc)}: minReplicas above maxReplicas")
    for name in sorted(AUTOSCALED - targets.keys()):
        problems.append(f"Deployment/{name}: no HorizontalPodAutoscaler")
    return problems


def only_the_gateway_is_exposed(docs: Sequence[Manifest]) -> list[str]:
    problems = []
    ingresses = [doc for doc in docs if doc.get("kind") == "Ingress"]
    if not ingresses:
        problems.append("Ingress/gateway: missing")
    for doc in ingresses:
        spec = doc["spec"]
        backends = [
            path["backend"]["service"]["name"]
            for rule in spec.get("rules", [])
            for path in rule.get("http", {}).get("paths", [])
        ]
        default = spec.get("defaultBackend", {}).get("service", {}).get("name")
        for name in sorted({*backends, *([default] if default else [])} - INGRESS_SERVICES):
            problems.append(f"{describe(doc)}: exposes Service {name}")
        hosts = {rule.get("host") for rule in spec.get("rules", [])}
        covered = {host for tls in spec.get("tls", []) for host in tls.get("hosts", [])}
        if None in hosts or not hosts <= covered:
            problems.append(f"{describe(doc)}: not every host is served over TLS")
    for doc in docs:
        if doc.get("kind") == "Service" and doc["spec"].get("type") in ("LoadBalancer", "NodePort"):
            problems.append(f"{describe(doc)}: type {doc['spec']['type']} bypasses the Ingress")
    return problems


def network_is_default_deny(docs: Sequence[Manifest]) -> list[str]:
    policies = [doc for doc in docs if doc.get("kind") == "NetworkPolicy"]
    default_deny = [
        p
        for p in policies
        if p["spec"].get("podSelector") in ({}, None)
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    problems = [] if default_deny else ["NetworkPolicy: no default deny for Ingress and Egress"]
    for doc, _spec in workloads(docs):
        labels = pod_labels(doc)
        allowing = [
            p
            for p in policies
            if p["spec"].get("podSelector")
            and selector_matches(p["spec"]["podSelector"], labels)
            and (p["spec"].get("ingress") or p["spec"].get("egress"))
        ]
        if not allowing:
            problems.append(f"{describe(doc)}: no NetworkPolicy allows its own flows")
    return problems


def _nats_config(docs: Sequence[Manifest]) -> Mapping[str, str]:
    """The files of the NATS server's configuration (the generated nats-config ConfigMap)."""
    for doc in docs:
        if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"].startswith("nats-config"):
            return doc.get("data") or {}
    return {}


def _directives(conf: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in conf.splitlines())
    return [line for line in lines if line]


def _env(container: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {item["name"]: item for item in container.get("env", []) or []}


def nats_secret(user: str) -> str:
    """The Secret holding a NATS user's password (key `password`)."""
    return "snapsell-nats-" + user.replace("_", "-")


def nats_requires_authorization(docs: Sequence[Manifest]) -> list[str]:
    """The NATS server runs with the users and permissions of infra/nats_users.py, reads every
    password from its user's Secret, and each service connects as its own user, holding no
    other NATS password."""
    files = _nats_config(docs)
    if "include ./authorization.conf" not in _directives(files.get("nats.conf", "")):
        return ["ConfigMap/nats-config: nats.conf does not include ./authorization.conf"]
    problems = []
    expected = render_authorization(lambda user: "$" + password_variable(user))
    if files.get("authorization.conf") != expected:
        problems.append(
            "ConfigMap/nats-config: authorization.conf differs from infra/nats_users.py "
            "(python -m infra.nats_users > deploy/base/nats/authorization.conf)"
        )
    users = [ADMIN_USER, *SERVICE_USERS]
    for doc, spec in workloads(docs):
        name = doc["metadata"]["name"]
        main = (spec.get("containers") or [{}])[0]
        env = _env(main)
        if doc.get("kind") == "StatefulSet" and name == "nats":
            for user in users:
                ref = env.get(password_variable(user), {}).get("valueFrom", {})
                if ref.get("secretKeyRef", {}).get("name") != nats_secret(user):
                    problems.append(
                        f"{describe(doc)}: {password_variable(user)} not from {nats_secret(user)}"
                    )
            continue
        user = name.replace("-", "_")
        if user not in SERVICE_USERS:
            continue
        ref = env.get("NATS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if env.get("NATS_USER", {}).get("value") != user or ref.get("name") != nats_secret(user):
            problems.append(f"{describe(doc)}: does not connect to NATS as user {user}")
        others = {nats_secret(u) for u in users} - {nats_secret(user)}
        for secret in sorted(referenced_secrets(doc) & others):
            problems.append(f"{describe(doc)}: holds another NATS user's Secret {secret}")
    return problems


def nats_uses_tls(docs: Sequence[Manifest]) -> list[str]:
    """Clients reach NATS over TLS only: a `tls` block in the server's configuration and
    `tls://` in every service's NATS_URL."""
    problems = []
    tls = " ".join(_directives(_nats_config(docs).get("tls.conf", "")))
    if not re.search(r"tls\s*\{.*cert_file.*key_file", tls):
        problems.append("ConfigMap/nats-config: tls.conf has no tls block with cert_file, key_file")
    for doc in docs:
        if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"].startswith("snapsell-config"):
            url = (doc.get("data") or {}).get("NATS_URL", "")
            if not url.startswith("tls://"):
                problems.append(f"{describe(doc)}: NATS_URL {url!r} is not tls://")
    return problems


# Overlays whose NATS clients must use TLS.
TLS_OVERLAYS = frozenset({"prod"})


def rules(documented_secrets: frozenset[str], overlay: str | None = None) -> dict[str, Rule]:
    """Every overlay's rules; `overlay` adds that overlay's own (TLS in production)."""
    tls = {"nats tls": nats_uses_tls} if overlay in TLS_OVERLAYS else {}
    return tls | {
        "nats authorization": nats_requires_authorization,
        "probes": containers_have_probes,
        "resources": containers_have_resources,
        "security context": containers_are_locked_down,
        "image tags": images_are_pinned,
        "disruption budgets": workloads_have_disruption_budgets,
        "secrets": secrets_are_referenced_not_inlined(documented_secrets),
        "autoscalers": scaled_services_have_autoscalers,
        "ingress": only_the_gateway_is_exposed,
        "network policies": network_is_default_deny,
    }
