"""How each service is wired: command, ports, probes, configuration, secrets, migrations,
replicas; checked on both overlays."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest

from tools.bench.otlp_sink import GATEWAY_PROTOCOL
from tools.deploy.render import Manifest

from .manifests import container, find, find_generated, of_kind

# Kubernetes name -> (python module, gRPC port, metrics port)
GRPC_SERVICES = {
    "routing": ("routing", 50051, 9101),
    "outbox": ("outbox", 50052, 9102),
    "live-session": ("live_session", 50053, 9103),
    "seller-admin": ("seller_admin", 50054, 9104),
    "live-catalog": ("live_catalog", 50055, 9105),
}
ALL_SERVICES = ("gateway", *GRPC_SERVICES)


def env_of(c: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {entry["name"]: entry for entry in c.get("env", [])}


def config(docs: list[Manifest]) -> Mapping[str, str]:
    return find_generated(docs, "ConfigMap", "snapsell-config-")["data"]


def test_gateway_serves_http_with_http_probes(docs: list[Manifest]) -> None:
    gateway = container(find(docs, "Deployment", "gateway"), "gateway")
    assert gateway["command"] == ["python", "-m", "services.gateway"]
    assert gateway["ports"] == [{"name": "http", "containerPort": 8080}]
    assert env_of(gateway)["HTTP_PORT"]["value"] == "8080"
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_gateway_runs_no_more_workers_than_its_cpu_limit_has_cores(
    docs: list[Manifest],
) -> None:
    gateway = container(find(docs, "Deployment", "gateway"), "gateway")
    workers = int(env_of(gateway)["GATEWAY_WORKERS"]["value"])
    limit = str(gateway["resources"]["limits"]["cpu"])
    cores = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert 1 <= workers <= max(1.0, cores)  # below one core, one process


@pytest.mark.parametrize("name", list(GRPC_SERVICES))
def test_grpc_services_use_native_grpc_probes_on_their_port(
    docs: list[Manifest], name: str
) -> None:
    module, grpc_port, metrics_port = GRPC_SERVICES[name]
    app = container(find(docs, "Deployment", name), name)
    assert app["command"] == ["python", "-m", f"services.{module}"]
    assert {p["containerPort"] for p in app["ports"]} == {grpc_port, metrics_port}
    env = env_of(app)
    assert env["GRPC_PORT"]["value"] == str(grpc_port)
    assert env["METRICS_PORT"]["value"] == str(metrics_port)
    for probe in ("startupProbe", "livenessProbe"):
        assert app[probe]["grpc"] == {"port": grpc_port}
    # Readiness asks the service's own health, NOT_SERVING while a background task is down.
    service_name = "".join(part.title() for part in module.split("_"))
    assert app["readinessProbe"]["grpc"] == {
        "port": grpc_port,
        "service": f"snapsell.{module}.v1.{service_name}Service",
    }
    service = find(docs, "Service", name)
    assert {p["port"] for p in service["spec"]["ports"]} == {grpc_port, metrics_port}
    annotations = find(docs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)


def test_one_job_migrates_every_service_as_the_migrator(docs: list[Manifest]) -> None:
    job = find(docs, "Job", "snapsell-migrate")
    spec = job["spec"]["template"]["spec"]
    images = {container(find(docs, "Deployment", name), name)["image"] for name in GRPC_SERVICES}
    assert {c["name"] for c in spec["containers"]} == set(GRPC_SERVICES)
    for name, (module, _, _) in GRPC_SERVICES.items():
        migrate = container(job, name)
        assert migrate["command"] == ["python", "-m", f"services.{module}", "migrate"]
        assert {migrate["image"]} == images
        env = env_of(migrate)
        assert env["DATABASE_URL"]["value"] == (
            "postgresql://$(PG_MIGRATOR_USER):$(PG_MIGRATOR_PASSWORD)@snapsell-pg-rw:5432/snapsell"
        )
        assert env["PG_MIGRATOR_USER"]["valueFrom"]["secretKeyRef"] == {
            "name": "snapsell-db-migrator",
            "key": "username",
        }
        # Nothing else: no service password, no signing key, no Twilio token.
        assert set(env) == {
            "PG_MIGRATOR_USER",
            "PG_MIGRATOR_PASSWORD",
            "DATABASE_URL",
            "PGSSLMODE",
            "PGSSLROOTCERT",
        }
        assert env["PGSSLMODE"]["value"] == "verify-full"
    assert spec["restartPolicy"] == "OnFailure"
    assert "snapsell.io/database-client" in job["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("name", list(GRPC_SERVICES))
def test_services_connect_as_their_own_role_and_never_get_the_admin_dsn(
    docs: list[Manifest], name: str
) -> None:
    deployment = find(docs, "Deployment", name)
    assert "initContainers" not in deployment["spec"]["template"]["spec"]
    env = env_of(container(deployment, name))
    assert "DATABASE_URL" not in env
    assert env["SERVICE_DATABASE_URL"]["value"] == (
        "postgresql://$(PG_SERVICE_USER):$(PG_SERVICE_PASSWORD)@snapsell-pg-rw:5432/snapsell"
    )
    assert env["PG_SERVICE_USER"]["valueFrom"]["secretKeyRef"] == {
        "name": f"snapsell-db-{name}",
        "key": "username",
    }
    assert env["PGSSLMODE"]["value"] == "verify-full"
    app = container(deployment, name)
    mounts = {m["mountPath"]: m["name"] for m in app["volumeMounts"]}
    assert mounts[str(env["PGSSLROOTCERT"]["value"]).rsplit("/", 1)[0]] == "postgres-ca"


def test_grpc_reflection_is_off_in_prod_only(rendered: dict[str, list[Manifest]]) -> None:
    assert config(rendered["prod"])["GRPC_REFLECTION"] == "false"
    assert "GRPC_REFLECTION" not in config(rendered["local"])


def test_gateway_has_no_database_or_signing_secret(docs: list[Manifest]) -> None:
    deployment = find(docs, "Deployment", "gateway")
    assert "initContainers" not in deployment["spec"]["template"]["spec"]
    env = env_of(container(deployment, "gateway"))
    assert not {"DATABASE_URL", "SERVICE_DATABASE_URL", "SNAPSELL_SIGNING_KEY_FILE"} & env.keys()
    assert {"TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_AUTH_TOKENS"} <= env.keys()


@pytest.mark.parametrize("name", list(GRPC_SERVICES))
def test_each_service_mounts_only_its_own_signing_key_and_the_trusted_keys(
    docs: list[Manifest], name: str
) -> None:
    pod = find(docs, "Deployment", name)["spec"]["template"]["spec"]
    signing = {
        v["secret"]["secretName"]
        for v in pod["volumes"]
        if v.get("secret", {}).get("secretName", "").startswith("snapsell-signing-")
    }
    assert signing == {f"snapsell-signing-{name}"}
    assert {v["name"]: v.get("configMap") for v in pod["volumes"]}["trusted-keys"] == {
        "name": "snapsell-trusted-keys"
    }
    app = container(find(docs, "Deployment", name), name)
    env = env_of(app)
    mounts = {m["name"]: m["mountPath"] for m in app["volumeMounts"]}
    assert env["SNAPSELL_SIGNING_KEY_FILE"]["value"] == f"{mounts['signing-key']}/key.pem"
    trusted = f"{mounts['trusted-keys']}/trusted-keys.json"
    assert env["SNAPSELL_TRUSTED_KEYS_FILE"]["value"] == trusted
    assert "SNAPSELL_JWT_SECRET" not in env
    for init in pod.get("initContainers", []):
        names = {m["name"] for m in init.get("volumeMounts", [])}
        assert "signing-key" not in names
        assert not {"SNAPSELL_JWT_SECRET", "SNAPSELL_SIGNING_KEY_FILE"} & env_of(init).keys()


def test_only_gateway_and_outbox_hold_twilio_credentials(docs: list[Manifest]) -> None:
    holders = {
        d["metadata"]["name"]
        for d in of_kind(docs, "Deployment")
        if "TWILIO_AUTH_TOKEN" in env_of(container(d, d["metadata"]["name"]))
    }
    assert holders == {"gateway", "outbox"}


@pytest.mark.parametrize("name", ALL_SERVICES)
def test_env_references_are_defined_before_use(docs: list[Manifest], name: str) -> None:
    # Kubernetes expands $(VAR) only from variables defined earlier in the same container;
    # an unknown reference is passed through literally, which would break the DSN silently.
    spec = find(docs, "Deployment", name)["spec"]["template"]["spec"]
    job = find(docs, "Job", "snapsell-migrate")["spec"]["template"]["spec"]
    for c in [*spec.get("initContainers", []), *spec["containers"], *job["containers"]]:
        defined: set[str] = set()
        for entry in c.get("env", []):
            for reference in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", entry.get("value", "")):
                assert reference in defined, f"{name}/{c['name']}: $({reference}) in {entry}"
            defined.add(entry["name"])


@pytest.mark.parametrize("name", ALL_SERVICES)
def test_services_read_the_shared_config_and_write_only_to_tmp(
    docs: list[Manifest], name: str
) -> None:
    deployment = find(docs, "Deployment", name)
    configmap = find_generated(docs, "ConfigMap", "snapsell-config-")["metadata"]["name"]
    spec = deployment["spec"]["template"]["spec"]
    tmp = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        assert c["envFrom"] == [{"configMapRef": {"name": configmap}}]
        writable = [m for m in c["volumeMounts"] if not m.get("readOnly")]
        assert [(m["mountPath"], m["name"] in tmp) for m in writable] == [("/tmp", True)]
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == name


def test_peer_addresses_point_at_real_service_ports(docs: list[Manifest]) -> None:
    data = config(docs)
    for key in ("SELLER_ADMIN_ADDR", "LIVE_SESSION_ADDR", "ROUTING_ADDR", "OUTBOX_ADDR"):
        host, port = data[key].split(":")
        ports = {p["port"] for p in find(docs, "Service", host)["spec"]["ports"]}
        assert int(port) in ports, key
    nats = urlsplit(data["NATS_URL"])
    assert nats.port in {
        p["port"] for p in find(docs, "Service", str(nats.hostname))["spec"]["ports"]
    }


def test_public_base_url_is_the_ingress_host_over_https(docs: list[Manifest]) -> None:
    url = urlsplit(config(docs)["PUBLIC_BASE_URL"])
    ingress = find(docs, "Ingress", "gateway")["spec"]
    assert url.scheme == "https"
    assert url.path in ("", "/")
    assert [rule["host"] for rule in ingress["rules"]] == [url.hostname]
    assert ingress["tls"] == [{"hosts": [url.hostname], "secretName": "snapsell-gateway-tls"}]
    paths = [p["path"] for p in ingress["rules"][0]["http"]["paths"]]
    assert paths == ["/webhooks/twilio"]


def test_stream_replicas_fit_the_nats_cluster(docs: list[Manifest]) -> None:
    replicas = int(config(docs)["NATS_STREAM_REPLICAS"])
    assert replicas == find(docs, "StatefulSet", "nats")["spec"]["replicas"]


def test_prod_runs_highly_available(rendered: dict[str, list[Manifest]]) -> None:
    prod = rendered["prod"]
    assert int(config(prod)["NATS_STREAM_REPLICAS"]) == 3
    assert find(prod, "Cluster", "snapsell-pg")["spec"]["instances"] == 3
    for hpa in of_kind(prod, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] >= 2
    for d in of_kind(prod, "Deployment"):
        if "replicas" in d["spec"]:
            assert d["spec"]["replicas"] >= 2
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in config(prod)


def test_prod_gateway_exports_its_spans_over_otlp_http(
    rendered: dict[str, list[Manifest]],
) -> None:
    """The HTTP exporter spares each gateway worker a gRPC stack (infra/telemetry.py); the
    other services keep the shared OTLP/gRPC endpoint, on the same collector."""
    prod = rendered["prod"]
    shared = urlsplit(config(prod)["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert "OTEL_EXPORTER_OTLP_PROTOCOL" not in config(prod)  # grpc, the default
    assert shared.port == 4317
    gateway = env_of(container(find(prod, "Deployment", "gateway"), "gateway"))
    # The benches trace their gateway over the same protocol (tools/bench/otlp_sink.py).
    assert gateway["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == GATEWAY_PROTOCOL == "http/protobuf"
    own = urlsplit(gateway["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"])
    assert (own.scheme, own.hostname, own.port) == (shared.scheme, shared.hostname, 4318)
    for name in GRPC_SERVICES:
        env = env_of(container(find(prod, "Deployment", name), name))
        assert not {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"} & set(env)


def test_local_runs_one_replica_of_everything(rendered: dict[str, list[Manifest]]) -> None:
    local = rendered["local"]
    assert find(local, "StatefulSet", "nats")["spec"]["replicas"] == 1
    assert find(local, "Cluster", "snapsell-pg")["spec"]["instances"] == 1
    autoscaled = set()
    for hpa in of_kind(local, "HorizontalPodAutoscaler"):
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 1)
        autoscaled.add(hpa["spec"]["scaleTargetRef"]["name"])
    for d in of_kind(local, "Deployment"):
        name = d["metadata"]["name"]
        assert d["spec"].get("replicas", 1) == 1 or name in autoscaled


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(docs: list[Manifest]) -> None:
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = find(docs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"]


def test_rolling_updates_never_drop_below_desired(docs: list[Manifest]) -> None:
    for d in of_kind(docs, "Deployment"):
        assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
