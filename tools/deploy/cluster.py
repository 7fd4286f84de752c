"""Talking to the Kubernetes cluster of the current kubectl context: is it there, does it have
the operators the manifests need, apply, and wait for the rollout."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.deploy.images import Engine, ImageError, push
from tools.deploy.render import Manifest

REQUEST_TIMEOUT = "--request-timeout=5s"

_CNPG = "the CloudNativePG operator"
_KEDA = "KEDA (autoscaling on work waiting)"
# Kind in the manifests -> the CustomResourceDefinition it needs in the cluster, and what
# provides it.
PREREQUISITES: Mapping[str, tuple[str, str]] = {
    "Cluster": ("clusters.postgresql.cnpg.io", _CNPG),
    "ScheduledBackup": ("scheduledbackups.postgresql.cnpg.io", _CNPG),
    "ObjectStore": (
        "objectstores.barmancloud.cnpg.io",
        "the Barman Cloud plugin for CloudNativePG",
    ),
    "PeerAuthentication": (
        "peerauthentications.security.istio.io",
        "the Istio service mesh (mutual TLS between the services)",
    ),
    "PrometheusRule": (
        "prometheusrules.monitoring.coreos.com",
        "the Prometheus Operator (the alert rules)",
    ),
    "ScaledObject": ("scaledobjects.keda.sh", _KEDA),
    "TriggerAuthentication": ("triggerauthentications.keda.sh", _KEDA),
}


def _kubectl(kubectl: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubectl, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def unreachable_reason(kubectl: str) -> str | None:
    """None when the current context's API server answers, else kubectl's own reason."""
    try:
        result = _kubectl(kubectl, "version", REQUEST_TIMEOUT, "-o", "json", timeout=20)
    except subprocess.TimeoutExpired:
        return "the API server did not answer within 20 s"
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"kubectl version exited {result.returncode}"


def current_context(kubectl: str) -> str:
    result = _kubectl(kubectl, "config", "current-context")
    return result.stdout.strip() if result.returncode == 0 else ""


@dataclass(frozen=True)
class Target:
    """The cluster kubectl talks to: its current context and that context's API server."""

    context: str
    server: str


def target(kubectl: str) -> Target | None:
    """None without a current context: kubectl would then try http://localhost:8080, which on
    a developer's machine is the gateway of `make run`, and report its 404 as NotFound."""
    context = current_context(kubectl)
    if not context:
        return None
    jsonpath = "jsonpath={.clusters[0].cluster.server}"
    result = _kubectl(kubectl, "config", "view", "--minify", "-o", jsonpath)
    return Target(context, result.stdout.strip() or "(no server set)")


def kubeconfig_source() -> str:
    """Where kubectl reads its configuration from, as the user would name it."""
    return (
        f"KUBECONFIG={os.environ['KUBECONFIG']}"
        if os.environ.get("KUBECONFIG")
        else "~/.kube/config"
    )


def missing_prerequisites(kubectl: str, docs: Sequence[Manifest]) -> list[str]:
    kinds = {str(doc.get("kind")) for doc in docs}
    missing = []
    for kind, (crd, what) in PREREQUISITES.items():
        if kind in kinds and _kubectl(kubectl, "get", "crd", crd, REQUEST_TIMEOUT).returncode != 0:
            missing.append(f"{what} (crd {crd} not found)")
    return sorted(set(missing))


def deliver_image(engine: Engine, reference: str, context: str) -> None:
    """Make a freshly built image available to the cluster: loaded straight into a kind or
    minikube node, pushed to its registry otherwise."""
    kind = shutil.which("kind")
    minikube = shutil.which("minikube")
    if context.startswith("kind-") and kind:
        command = [kind, "load", "docker-image", reference, "--name", context.removeprefix("kind-")]
    elif context == "minikube" and minikube:
        command = [minikube, "image", "load", reference]
    else:
        push(engine, reference)
        return
    print(f"loading {reference} into {context}")
    if subprocess.run(command, check=False).returncode != 0:
        raise ImageError(f"could not load {reference} into {context}")


def apply(kubectl: str, rendered: Path) -> bool:
    return subprocess.run([kubectl, "apply", "-f", str(rendered)], check=False).returncode == 0


def replace_jobs(kubectl: str, docs: Sequence[Manifest]) -> bool:
    """Delete the previous release's Jobs (the migrations Job): a Job's pod template cannot be
    changed, so each release applies a new one. A migration interrupted here is rolled back
    (each runs in its own transaction) and the new Job applies it again."""
    for doc in docs:
        if doc.get("kind") != "Job":
            continue
        namespace = doc.get("metadata", {}).get("namespace", "default")
        name = doc.get("metadata", {}).get("name")
        command = [kubectl, "-n", namespace, "delete", "job", str(name), "--ignore-not-found"]
        if subprocess.run([*command, "--wait=true"], check=False).returncode != 0:
            return False
    return True


def rollout_steps(docs: Sequence[Manifest]) -> list[list[str]]:
    """kubectl arguments to wait on, in order: the stores, then the migrations Job, then every
    Deployment (whose pods start on the migrated schema)."""
    stores: list[list[str]] = []
    jobs: list[list[str]] = []
    deployments: list[list[str]] = []
    for doc in docs:
        namespace = doc.get("metadata", {}).get("namespace", "default")
        name = doc.get("metadata", {}).get("name")
        if doc.get("kind") == "StatefulSet":
            stores.insert(0, ["-n", namespace, "rollout", "status", f"statefulset/{name}"])
        elif doc.get("kind") == "Cluster":
            resource = f"cluster.postgresql.cnpg.io/{name}"
            stores.insert(0, ["-n", namespace, "wait", "--for=condition=Ready", resource])
        elif doc.get("kind") == "Job":
            jobs.append(["-n", namespace, "wait", "--for=condition=Complete", f"job/{name}"])
        elif doc.get("kind") == "Deployment":
            deployments.append(["-n", namespace, "rollout", "status", f"deployment/{name}"])
    return [*stores, *jobs, *deployments]


def wait_for_rollout(kubectl: str, docs: Sequence[Manifest]) -> bool:
    for step in rollout_steps(docs):
        if subprocess.run([kubectl, *step, "--timeout=15m"], check=False).returncode != 0:
            return False
    return True
