"""Per-installation values live outside tracked files: `make deploy-init` writes
deploy/installations/<name>/ (git-ignored) from deploy/installation-template, `make deploy
ENV=<name>` deploys it, and a `change-me` left anywhere is refused with the file that holds it."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import find, find_generated
from tools.deploy import rollout
from tools.deploy.check import run_check
from tools.deploy.installation import Values, create
from tools.deploy.layout import DEPLOY_DIR, OPERATIONS_DOC, REPO_ROOT

ALL_VALUES = Values(
    host="messaging.acme.example",
    image_repo="registry.acme.example:5000/snapsell/messaging",
    backup_path="s3://acme-backups/snapsell-pg",
)


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY_DIR, copy, ignore=shutil.ignore_patterns("installations"))
    return copy


@pytest.fixture
def kubeconfig_without_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were anything to reach a cluster, it would fail: the refusals must come first."""
    config = tmp_path / "kubeconfig"
    config.write_text("")
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.setenv("HOME", str(tmp_path))


def test_prod_refusal_names_the_file_of_each_placeholder_and_the_way_out(
    kubeconfig_without_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = rollout.deploy("prod", "1.4.0", None, tmp_path)
    stderr = capsys.readouterr().err
    assert code == 1
    lines = {line.strip() for line in stderr.splitlines()}
    assert {
        "- host: messaging.change-me.example  (deploy/overlays/prod/ingress-host.yaml)",
        "destinationPath: s3://change-me-backup-bucket/snapsell-pg  "
        "(deploy/overlays/prod/backups.yaml)",
        "PUBLIC_BASE_URL: https://messaging.change-me.example  "
        "(deploy/overlays/prod/kustomization.yaml)",
        "image: registry.change-me.example/snapsell/messaging:1.4.0  "
        "(deploy/overlays/prod/kustomization.yaml)",
    } <= lines
    assert "make deploy-init NAME=<name>" in stderr
    assert "no kubectl context" not in stderr


def test_an_installation_with_every_value_deploys_without_placeholders(
    deploy_copy: Path, tmp_path: Path
) -> None:
    made = create("acme", ALL_VALUES, deploy_copy)
    assert made == deploy_copy / "installations" / "acme"
    release = rollout.plan("acme", "1.4.0", None, tmp_path / "out", deploy_copy)
    assert rollout.placeholders(release.stream) == []
    docs = list(release.docs)
    gateway = find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["image"] == "registry.acme.example:5000/snapsell/messaging:1.4.0"
    ingress = find(docs, "Ingress", "gateway")["spec"]
    assert ingress["rules"][0]["host"] == ingress["tls"][0]["hosts"][0] == ALL_VALUES.host
    config = find_generated(docs, "ConfigMap", "snapsell-config")["data"]
    assert config["PUBLIC_BASE_URL"] == "https://messaging.acme.example"
    assert config["GRPC_REFLECTION"] == "false"  # everything else is prod's
    backups = find(docs, "ObjectStore", "snapsell-pg-backups")["spec"]["configuration"]
    assert backups["destinationPath"] == ALL_VALUES.backup_path
    assert {d["kind"] for d in docs} >= {"PeerAuthentication", "PrometheusRule"}


def test_an_installation_missing_values_is_refused_naming_its_own_file(
    deploy_copy: Path,
    tmp_path: Path,
    kubeconfig_without_cluster: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    create("half", Values(host="messaging.half.example"), deploy_copy)
    code = rollout.deploy("half", "1.4.0", None, tmp_path / "out", deploy_copy)
    stderr = capsys.readouterr().err
    assert code == 1
    own = str(deploy_copy / "installations" / "half" / "kustomization.yaml")
    lines = {line.strip() for line in stderr.splitlines()}
    assert f"destinationPath: s3://change-me-backup-bucket/snapsell-pg  ({own})" in lines
    assert "set them in the files named" in stderr
    assert "host:" not in stderr  # given, so not a placeholder any more


def test_installations_are_git_ignored_and_the_template_is_tracked() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/installations/acme/kustomization.yaml"],
        cwd=REPO_ROOT,
        check=False,
    )
    assert ignored.returncode == 0
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "deploy/installation-template/kustomization.yaml"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
    )
    assert tracked.returncode == 0


def run_init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.deploy", "init", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_init_writes_once_and_refuses_bad_input_in_one_line(deploy_copy: Path) -> None:
    where = ("--deploy-dir", str(deploy_copy))
    done = run_init("--name", "acme", "--host", "messaging.acme.example", *where)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "then: make deploy ENV=acme IMAGE_TAG=..."
    assert "still 'change-me': destinationPath:" in done.stdout
    written = yaml.safe_load((deploy_copy / "installations/acme/kustomization.yaml").read_text())
    assert written["resources"] == ["../../overlays/prod"]

    for args, message in (
        (("--name", "acme"), "already exists; edit it, or remove it first"),
        (("--name", "prod"), "NAME must be lowercase letters, digits and '-'"),
        (("--name", "Big Shop"), "NAME must be lowercase letters, digits and '-'"),
        (("--name", "x", "--host", "https://a.example"), "HOST must be a DNS name"),
        (("--name", "x", "--backup-path", "/mnt/backups"), "BACKUP_PATH must be an s3:// URL"),
    ):
        done = run_init(*args, *where)
        assert done.returncode == 1, args
        assert done.stderr.startswith("make deploy-init: ") and message in done.stderr, args
        assert done.stderr.count("\n") == 1


def test_deploy_check_fails_when_the_template_misses_a_placeholder(deploy_copy: Path) -> None:
    template = deploy_copy / "installation-template" / "kustomization.yaml"
    text = template.read_text()
    template.write_text(text[: text.index("  # Where the PostgreSQL backups go")])
    report = io.StringIO()
    assert run_check(deploy_copy, OPERATIONS_DOC, out=report) == 1
    out = report.getvalue()
    assert (
        "  FAIL installation-template: placeholder not covered by the template: "
        "destinationPath: s3://change-me-backup-bucket/snapsell-pg"
    ) in out.splitlines()


def test_an_unknown_environment_points_at_deploy_init(tmp_path: Path) -> None:
    with pytest.raises(rollout.DeployError, match=r"make deploy-init NAME=\.\.\."):
        rollout.plan("staging", "1.0.0", None, tmp_path)
