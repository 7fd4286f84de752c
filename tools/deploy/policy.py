"""Deployment policies, checked on rendered manifests without a cluster.

Each rule takes every document of one rendered overlay and returns one line per violation,
naming the object and what is wrong. `make deploy-check` fails on any line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from infra.config import ConfigError
from infra.nats_users import ADMIN_USER, SERVICE_USERS, password_variable, render_authorization
from services.gateway.config import parse_forwarded_allow_ips
from tools.deploy.layout import APP_IMAGE
from tools.deploy.render import Manifest, describe

Rule = Callable[[Sequence[Manifest]], list[str]]
# Secret name -> the workloads (Deployment, StatefulSet, Job names) whose pods may hold it:
# the "Pods that hold it" column of docs/OPERATIONS.md's Secrets table.
SecretHolders = Mapping[str, frozenset[str]]

# Kinds that run pods continuously, and therefore need probes and disruption budgets.
LONG_RUNNING_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"})
# Deployments that must scale horizontally (ARCHITECTURE.md: gateway and outbox scale out,
# routing's consumer is safe with N replicas).
AUTOSCALED = frozenset({"gateway", "routing", "outbox"})
# Deployments that work through a queue, and the KEDA triggers that measure one: JetStream
# consumer lag, a count of rows waiting (docs/OPERATIONS.md, "Autoscaling").
QUEUE_SCALED = frozenset({"routing", "live-catalog", "outbox"})
WORK_WAITING_TRIGGERS = frozenset({"nats-jetstream", "postgresql"})
INGRESS_SERVICES = frozenset({"gateway"})

_SECRETISH_KEY = re.compile(r"secret", re.IGNORECASE)
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
_CNPG_CLUSTER = ("postgresql.cnpg.io/", "Cluster")
# The admin DSN (infra/db.py): only the migrations Job may have it.
ADMIN_DSN_VARIABLE = "DATABASE_URL"
# The OpenTelemetry collector's standard port of each OTLP protocol (infra/telemetry.py).
OTLP_PORTS = {"grpc": 4317, "http/protobuf": 4318}
MESH_INJECT_LABEL = "sidecar.istio.io/inject"
_CREDENTIAL_BLOCKS = frozenset({"s3Credentials", "azureCredentials", "googleCredentials"})


# --- helpers -----------------------------------------------------------------------------


def pod_spec(doc: Manifest) -> Mapping[str, Any] | None:
    spec: Mapping[str, Any] | None = None
    if doc.get("kind") in LONG_RUNNING_KINDS or doc.get("kind") == "Job":
        spec = doc.get("spec", {}).get("template", {}).get("spec")
    elif doc.get("kind") == "CronJob":
        job = doc.get("spec", {}).get("jobTemplate", {}).get("spec", {})
        spec = job.get("template", {}).get("spec")
    return spec


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


def is_app_image(image: str) -> bool:
    """Our own image (any registry, any tag): `make deploy` sets an immutable tag on it."""
    repository = image.split("@", 1)[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    return repository == APP_IMAGE or repository.endswith("/" + APP_IMAGE)


def is_cnpg_cluster(doc: Manifest) -> bool:
    return str(doc.get("apiVersion", "")).startswith(_CNPG_CLUSTER[0]) and (
        doc.get("kind") == _CNPG_CLUSTER[1]
    )


def module_of(container: Mapping[str, Any]) -> str | None:
    """X for a container running `python -m services.X [...]`."""
    command = [str(part) for part in container.get("command") or []]
    if len(command) >= 3 and command[:2] == ["python", "-m"]:
        if command[2].startswith("services."):
            return command[2].removeprefix("services.")
    return None


def runs_migrations(container: Mapping[str, Any]) -> bool:
    command = [str(part) for part in container.get("command") or []]
    return module_of(container) is not None and command[3:] == ["migrate"]


def env_names(container: Mapping[str, Any]) -> set[str]:
    return {str(entry["name"]) for entry in container.get("env") or []}


def env_value(
    container: Mapping[str, Any], name: str, config_maps: Mapping[str, Mapping[str, str]]
) -> str | None:
    """NAME's value as the container sees it: `env` wins over `envFrom` ConfigMaps."""
    for entry in container.get("env") or []:
        if entry.get("name") == name and "value" in entry:
            return str(entry["value"])
    value = None
    for source in container.get("envFrom") or []:
        ref = (source.get("configMapRef") or {}).get("name")
        if isinstance(ref, str) and ref in config_maps and name in config_maps[ref]:
            value = str(config_maps[ref][name])
    return value


def grpc_deployments(docs: Sequence[Manifest]) -> Iterator[tuple[Manifest, Mapping[str, Any]]]:
    """Deployments and the container of theirs that serves gRPC (it sets GRPC_PORT)."""
    for doc, spec in workloads(docs):
        if doc["kind"] != "Deployment":
            continue
        for kind, container in containers(spec):
            if kind == "container" and "GRPC_PORT" in env_names(container):
                yield doc, container


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


def third_party_images_by_digest(docs: Sequence[Manifest]) -> list[str]:
    """Every image but our own is pinned by digest, PostgreSQL's (CloudNativePG's imageName,
    not a catalog someone else updates) included: a tag can be moved to other content."""
    problems = []
    for doc, spec in workloads(docs):
        for kind, container in containers(spec):
            image = str(container.get("image", ""))
            if not is_app_image(image) and not _DIGEST.search(image):
                problems.append(
                    f"{describe(doc)}: {kind} {container['name']}: "
                    f"image {image!r} is not pinned by digest"
                )
    for doc in docs:
        if is_cnpg_cluster(doc):
            image = str(doc["spec"].get("imageName", ""))
            if not _DIGEST.search(image):
                problems.append(f"{describe(doc)}: PostgreSQL image is not pinned by digest")
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


def dockerfile_bases_by_digest(dockerfile: str) -> list[str]:
    """The base images a Dockerfile pulls (its `ARG *IMAGE*=` defaults and literal `FROM`s)
    are pinned by digest."""
    problems = []
    for line in dockerfile.splitlines():
        arg = re.match(r"^ARG\s+(\w*IMAGE\w*)=(\S+)", line)
        base = re.match(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", line)
        image = arg.group(2) if arg else base.group(1) if base else None
        if image and "$" not in image and not _DIGEST.search(image):
            problems.append(f"Dockerfile: base image {image!r} is not pinned by digest")
    return problems


def pods_hold_only_their_secrets(holders: SecretHolders) -> Rule:
    """A pod (init containers, env, volumes) refers only to the Secrets the Secrets table
    gives it: a service never holds another's password, the migrator's DSN, the Twilio token
    or a key it does not use."""

    def rule(docs: Sequence[Manifest]) -> list[str]:
        problems = []
        for doc, spec in workloads(docs):
            name = doc["metadata"]["name"]
            for secret in sorted(referenced_secrets(spec)):
                if name not in holders.get(secret, frozenset()):
                    problems.append(
                        f"{describe(doc)}: holds Secret {secret!r}, which docs/OPERATIONS.md "
                        f"does not give to {name}"
                    )
        return problems

    return rule


def no_database_superuser(docs: Sequence[Manifest]) -> list[str]:
    """CloudNativePG's superuser is off, and only the migrations Job gets an admin DSN."""
    problems = []
    superuser_secrets = set()
    for doc in docs:
        if is_cnpg_cluster(doc):
            superuser_secrets.add(f"{doc['metadata']['name']}-superuser")
            if doc["spec"].get("enableSuperuserAccess") is not False:
                problems.append(f"{describe(doc)}: enableSuperuserAccess is not false")
    for doc, spec in workloads(docs):
        for secret in sorted(referenced_secrets(spec) & superuser_secrets):
            problems.append(f"{describe(doc)}: holds the superuser Secret {secret!r}")
        for kind, container in containers(spec):
            if ADMIN_DSN_VARIABLE in env_names(container) and not (
                doc["kind"] == "Job" and runs_migrations(container)
            ):
                problems.append(
                    f"{describe(doc)}: {kind} {container['name']}: gets the admin "
                    f"{ADMIN_DSN_VARIABLE} (only the migrations Job may)"
                )
    return problems


def migrations_run_in_one_job(docs: Sequence[Manifest]) -> list[str]:
    """One Job per release runs `python -m services.X migrate` with the admin DSN for every
    service with a database; no Deployment migrates in an init container."""
    needed = set()
    problems = []
    for doc, spec in workloads(docs):
        if doc["kind"] == "Job":
            continue
        database_client = pod_labels(doc).get("snapsell.io/database-client") == "true"
        for kind, container in containers(spec):
            module = module_of(container)
            if runs_migrations(container):
                problems.append(
                    f"{describe(doc)}: {kind} {container['name']}: runs migrations "
                    "(the migrations Job does)"
                )
            elif database_client and kind == "container" and module is not None:
                needed.add(module)
    jobs = [
        (doc, spec)
        for doc, spec in workloads(docs)
        if doc["kind"] == "Job" and any(runs_migrations(c) for _k, c in containers(spec))
    ]
    if len(jobs) != 1:
        problems.append(f"Job: {len(jobs)} migrations Jobs (one per release is expected)")
        return problems
    job, spec = jobs[0]
    migrated = set()
    for kind, container in containers(spec):
        if runs_migrations(container):
            migrated.add(module_of(container))
            if ADMIN_DSN_VARIABLE not in env_names(container):
                problems.append(
                    f"{describe(job)}: {kind} {container['name']}: no {ADMIN_DSN_VARIABLE} "
                    "(the migrator's DSN)"
                )
    for module in sorted(needed - migrated):
        problems.append(f"{describe(job)}: does not run services.{module} migrate")
    return problems


def config_maps_of(docs: Sequence[Manifest]) -> dict[str, Mapping[str, str]]:
    """ConfigMap name -> its data."""
    return {
        doc["metadata"]["name"]: doc.get("data") or {}
        for doc in docs
        if doc.get("kind") == "ConfigMap"
    }


def otlp_endpoints_match_protocols(docs: Sequence[Manifest]) -> list[str]:
    """A service exporting spans sends them to the collector port of its protocol (OTLP/gRPC
    on 4317, OTLP/HTTP on 4318): the other port refuses every export, and nothing else says so
    but the exporter's log."""
    config_maps = config_maps_of(docs)
    problems = []
    for doc, spec in workloads(docs):
        for kind, container in containers(spec):
            if module_of(container) is None:
                continue
            endpoint = env_value(container, "OTEL_EXPORTER_OTLP_ENDPOINT", config_maps)
            if not endpoint:
                continue
            protocol = (
                env_value(container, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", config_maps)
                or env_value(container, "OTEL_EXPORTER_OTLP_PROTOCOL", config_maps)
                or "grpc"
            )
            where = f"{describe(doc)}: {kind} {container['name']}"
            expected = OTLP_PORTS.get(protocol)
            if expected is None:
                problems.append(f"{where}: unknown OTLP protocol {protocol!r}")
                continue
            try:
                port = urlsplit(endpoint).port
            except ValueError:
                port = None
            if port != expected:
                problems.append(
                    f"{where}: OTLP over {protocol} goes to port {expected}, not {endpoint}"
                )
    return problems


def grpc_reflection_is_off(docs: Sequence[Manifest]) -> list[str]:
    """Production: no gRPC server lists its API to whoever reaches its port."""
    config_maps = config_maps_of(docs)
    problems = []
    for doc, container in grpc_deployments(docs):
        if env_value(container, "GRPC_REFLECTION", config_maps) != "false":
            problems.append(
                f"{describe(doc)}: container {container['name']}: GRPC_REFLECTION is not false"
            )
    return problems


def grpc_traffic_is_mutual_tls(docs: Sequence[Manifest]) -> list[str]:
    """Production: every gRPC server's pods join the mesh (Istio sidecar) and a STRICT
    PeerAuthentication selects them, so plaintext calls to a gRPC port are refused."""
    policies = [
        doc
        for doc in docs
        if doc.get("kind") == "PeerAuthentication"
        and str(doc.get("apiVersion", "")).startswith("security.istio.io/")
    ]
    problems = []
    for doc, container in grpc_deployments(docs):
        labels = pod_labels(doc)
        if labels.get(MESH_INJECT_LABEL) != "true":
            problems.append(f"{describe(doc)}: pods are not in the mesh ({MESH_INJECT_LABEL})")
        grpc_ports = {
            int(port["containerPort"])
            for port in container.get("ports") or []
            if port.get("name") == "grpc"
        }
        strict = [
            policy
            for policy in policies
            if policy["metadata"].get("namespace") == doc["metadata"].get("namespace")
            and selector_matches((policy["spec"].get("selector") or {}), labels)
            and (policy["spec"].get("mtls") or {}).get("mode") == "STRICT"
            and not any(
                int(port) in grpc_ports and (level or {}).get("mode") != "STRICT"
                for port, level in (policy["spec"].get("portLevelMtls") or {}).items()
            )
        ]
        if not strict:
            problems.append(
                f"{describe(doc)}: no STRICT PeerAuthentication requires mTLS on its gRPC port"
            )
    return problems


def _autoscaled(doc: Manifest) -> tuple[str, str, int, int] | None:
    """(target kind, target name, least, most replicas) of an autoscaler: a
    HorizontalPodAutoscaler, or a KEDA ScaledObject (which makes its own)."""
    spec = doc.get("spec", {})
    if doc.get("kind") == "HorizontalPodAutoscaler":
        least, most = spec.get("minReplicas", 1), spec["maxReplicas"]
    elif doc.get("kind") == "ScaledObject":
        least, most = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    else:
        return None
    target = spec["scaleTargetRef"]
    return target.get("kind", "Deployment"), target.get("name", ""), least, most


def scaled_services_have_autoscalers(docs: Sequence[Manifest]) -> list[str]:
    """Each Deployment of AUTOSCALED has an autoscaler, none has two, and one that has an
    autoscaler sets no replica count (each apply would undo what the autoscaler chose)."""
    deployments = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Deployment"}
    owners: dict[str, list[str]] = {}
    problems = []
    for doc in docs:
        scaled = _autoscaled(doc)
        if scaled is None:
            continue
        kind, name, least, most = scaled
        if kind != "Deployment" or name not in deployments:
            problems.append(f"{describe(doc)}: scales {kind}/{name}")
            continue
        owners.setdefault(name, []).append(describe(doc))
        if least > most:
            problems.append(f"{describe(doc)}: fewest replicas above most")
    for name, scalers in sorted(owners.items()):
        if len(scalers) > 1:
            problems.append(f"Deployment/{name}: scaled by {' and '.join(scalers)}")
        if "replicas" in deployments[name]["spec"]:
            problems.append(f"Deployment/{name}: sets replicas, which {scalers[0]} owns")
    for name in sorted(AUTOSCALED - owners.keys()):
        problems.append(f"Deployment/{name}: no autoscaler")
    return problems


def consumers_scale_on_work_waiting(docs: Sequence[Manifest]) -> list[str]:
    """In production, the services that work through a queue scale on its length (KEDA),
    not on CPU: a consumer waiting on a slow peer uses no CPU while its backlog grows."""
    scaled = {
        target[1]: doc
        for doc in docs
        if doc.get("kind") == "ScaledObject" and (target := _autoscaled(doc)) is not None
    }
    problems = []
    for name in sorted(QUEUE_SCALED):
        doc = scaled.get(name)
        if doc is None:
            problems.append(f"Deployment/{name}: no ScaledObject (KEDA) scales it on work waiting")
            continue
        for trigger in doc["spec"]["triggers"]:
            if trigger["type"] not in WORK_WAITING_TRIGGERS:
                problems.append(f"{describe(doc)}: trigger {trigger['type']} is not work waiting")
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


def gateway_trusts_only_its_proxies(docs: Sequence[Manifest]) -> list[str]:
    """Behind the ingress every request comes from the ingress controller: without a trusted
    proxy range the gateway counts all clients as one (one forger blocks everyone), and with
    `*` any client picks the address it is counted as."""
    problems = []
    for doc, spec in workloads(docs):
        if doc["metadata"]["name"] not in INGRESS_SERVICES:
            continue
        for kind, c in containers(spec):
            if c["name"] not in INGRESS_SERVICES:
                continue
            env = {e["name"]: e.get("value") for e in c.get("env", []) or []}
            where = f"{describe(doc)}: {kind} {c['name']}"
            value = env.get("GATEWAY_FORWARDED_ALLOW_IPS")
            if not value:
                problems.append(f"{where}: no trusted proxies (GATEWAY_FORWARDED_ALLOW_IPS)")
                continue
            try:
                parse_forwarded_allow_ips(value)
            except ConfigError as error:
                problems.append(f"{where}: {error}")
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


def rules(
    documented_secrets: frozenset[str],
    secret_holders: SecretHolders | None = None,
    *,
    production: bool = False,
) -> dict[str, Rule]:
    """Every overlay's rules, and with PRODUCTION the production-only ones."""
    every = {
        "probes": containers_have_probes,
        "resources": containers_have_resources,
        "security context": containers_are_locked_down,
        "image tags": images_are_pinned,
        "image digests": third_party_images_by_digest,
        "disruption budgets": workloads_have_disruption_budgets,
        "secrets": secrets_are_referenced_not_inlined(documented_secrets),
        "secret holders": pods_hold_only_their_secrets(secret_holders or {}),
        "database superuser": no_database_superuser,
        "migrations": migrations_run_in_one_job,
        "autoscalers": scaled_services_have_autoscalers,
        "ingress": only_the_gateway_is_exposed,
        "trusted proxies": gateway_trusts_only_its_proxies,
        "network policies": network_is_default_deny,
        "nats authorization": nats_requires_authorization,
        "otlp ports": otlp_endpoints_match_protocols,
    }
    if production:
        every["grpc reflection"] = grpc_reflection_is_off
        every["grpc mtls"] = grpc_traffic_is_mutual_tls
        every["nats tls"] = nats_uses_tls
        every["work-waiting autoscaling"] = consumers_scale_on_work_waiting
    return every
