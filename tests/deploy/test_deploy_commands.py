"""The make entry points as processes: `deploy-check` passes here and fails on a deliberately
broken copy of deploy/; `deploy` shows what it would apply and stops without a cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools.deploy import cluster, rollout
from tools.deploy.layout import DEPLOY_DIR, OPERATIONS_DOC, REPO_ROOT
from tools.deploy.render import parse


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.deploy", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def no_cluster(tmp_path: Path) -> dict[str, str]:
    """An environment whose kubectl context points at a port nothing listens on."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "gone", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "me", "user": {"token": "x"}}],
                "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "me"}}],
                "current-context": "gone",
            }
        )
    )
    return {**os.environ, "KUBECONFIG": str(kubeconfig)}


def test_deploy_check_fails_on_a_deliberately_broken_manifest(tmp_path: Path) -> None:
    broken = tmp_path / "deploy"
    shutil.copytree(DEPLOY_DIR, broken)
    gateway = broken / "base" / "gateway" / "gateway.yaml"
    text = gateway.read_text()
    # Drop the gateway's readiness probe and move NATS to a floating tag (both overlays)...
    start = text.index("          readinessProbe:")
    end = text.index("          lifecycle:", start)
    gateway.write_text(text[:start] + text[end:])
    nats = broken / "base" / "nats" / "nats.yaml"
    nats.write_text(nats.read_text().replace("image: nats:2.", "image: nats:latest # was 2."))
    # ...and make the local overlay unrenderable.
    (broken / "overlays" / "local" / "ingress-host.yaml").unlink()

    result = run_tool("check", "--deploy-dir", str(broken), "--operations-doc", str(OPERATIONS_DOC))

    assert result.returncode == 1
    failures = [line.strip() for line in result.stdout.splitlines() if line.startswith("  FAIL ")]
    assert failures[0].startswith("FAIL local: render: ")
    assert "ingress-host.yaml" in failures[0]
    assert failures[1:] == [
        "FAIL prod: probes: Deployment/gateway: container gateway: no readinessProbe",
        "FAIL prod: image tags: StatefulSet/nats: container nats: "
        "image 'nats:latest' uses the latest tag",
        "FAIL prod: image digests: StatefulSet/nats: container nats: "
        "image 'nats:latest' is not pinned by digest",
        # An installation made from the template inherits prod's manifests, and their faults.
        "FAIL installation-template: probes: Deployment/gateway: container gateway: "
        "no readinessProbe",
        "FAIL installation-template: image tags: StatefulSet/nats: container nats: "
        "image 'nats:latest' uses the latest tag",
        "FAIL installation-template: image digests: StatefulSet/nats: container nats: "
        "image 'nats:latest' is not pinned by digest",
    ]
    assert result.stdout.splitlines()[-1] == "deploy-check: FAILED"


def test_deploy_without_a_cluster_shows_what_it_would_apply_and_fails(
    no_cluster: dict[str, str], tmp_path: Path
) -> None:
    render_dir = tmp_path / "rendered"
    result = run_tool(
        "deploy",
        "--env",
        "local",
        "--image-tag",
        "1.2.3",
        "--render-dir",
        str(render_dir),
        env=no_cluster,
    )

    assert result.returncode == 1
    assert result.stderr.startswith(
        "make deploy: no reachable Kubernetes cluster at https://127.0.0.1:9 "
        f"(kubectl context 'gone', KUBECONFIG={no_cluster['KUBECONFIG']}): "
    )
    assert "nothing was applied" in result.stderr
    rendered = render_dir / "local.yaml"
    docs = parse(rendered.read_text())
    listed = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == [f"{d['kind']}/{d['metadata']['name']}" for d in docs]
    assert {"Deployment/gateway", "StatefulSet/nats", "Cluster/snapsell-pg"} <= set(listed)
    assert f"rendered manifests: {rendered}" in result.stdout
    images = {
        c["image"]
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"snapsell/messaging:1.2.3"}


def test_without_a_kubectl_context_deploy_names_the_missing_context_and_tries_nothing(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "kubeconfig"
    empty.write_text("")
    # HOME too: kubectl would otherwise read ~/.kube/config when KUBECONFIG names nothing usable.
    env = {**os.environ, "KUBECONFIG": str(empty), "HOME": str(tmp_path)}
    result = run_tool(
        "deploy", "--env", "local", "--image-tag", "1.2.3", "--render-dir", str(tmp_path), env=env
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"make deploy: no kubectl context is set (KUBECONFIG={empty})")
    assert "localhost:8080" in result.stderr and "NotFound" not in result.stderr
    assert "kubectl config use-context NAME" in result.stderr
    assert result.stderr.count("\n") == 1


def test_prod_requires_an_image_tag(no_cluster: dict[str, str], tmp_path: Path) -> None:
    result = run_tool("deploy", "--env", "prod", "--render-dir", str(tmp_path), env=no_cluster)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "make deploy: IMAGE_TAG is required for prod: the immutable tag of an image already built"
    )


def test_latest_is_never_deployed(no_cluster: dict[str, str], tmp_path: Path) -> None:
    result = run_tool(
        "deploy",
        "--env",
        "prod",
        "--image-tag",
        "latest",
        "--render-dir",
        str(tmp_path),
        env=no_cluster,
    )
    assert result.returncode == 1
    assert "must not be 'latest'" in result.stderr


def test_unknown_environment_is_refused(tmp_path: Path) -> None:
    result = run_tool("deploy", "--env", "staging", "--render-dir", str(tmp_path))
    assert result.returncode == 1
    assert "ENV must be one of local, prod" in result.stderr


def test_prod_refuses_placeholders_before_touching_a_cluster(
    no_cluster: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KUBECONFIG", no_cluster["KUBECONFIG"])
    code = rollout.deploy("prod", "1.4.0", "registry.example.com/snapsell/messaging", tmp_path)
    stderr = capsys.readouterr().err
    assert code == 1
    assert "'change-me' placeholders" in stderr
    assert "host: messaging.change-me.example" in stderr
    assert "destinationPath: s3://change-me-backup-bucket/snapsell-pg" in stderr
    assert "registry.change-me.example" not in stderr  # IMAGE_REPO replaced it
    assert "no reachable Kubernetes cluster" not in stderr


def test_render_prints_the_manifests_with_the_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rollout.render_only("prod", "2.0.0", "r.example/s/m", tmp_path) == 0
    stream = capsys.readouterr().out
    docs = parse(stream)
    outbox = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "outbox"
    )
    migrate = next(d for d in docs if d["kind"] == "Job")
    assert outbox["spec"]["template"]["spec"]["containers"][0]["image"] == "r.example/s/m:2.0.0"
    for c in migrate["spec"]["template"]["spec"]["containers"]:
        assert c["image"] == "r.example/s/m:2.0.0"
    assert (tmp_path / "prod.yaml").read_text() == stream


def test_local_deploys_as_committed(tmp_path: Path) -> None:
    release = rollout.plan("local", None, None, tmp_path)
    assert release.tag not in ("", "latest")
    assert release.image == f"snapsell/messaging:{release.tag}"
    assert rollout.placeholders(release.stream) == []


def test_rollout_waits_for_the_stores_then_the_migrations_then_the_services(
    tmp_path: Path,
) -> None:
    release = rollout.plan("local", None, None, tmp_path)
    steps = [" ".join(step[2:]) for step in cluster.rollout_steps(release.docs)]
    migrations = steps.index("wait --for=condition=Complete job/snapsell-migrate")
    stores = [i for i, step in enumerate(steps) if "statefulset/" in step or "cluster." in step]
    services = [i for i, step in enumerate(steps) if "deployment/" in step]
    assert len(stores) == 2 and len(services) == 6
    assert max(stores) < migrations < min(services)
