"""The image: what the Dockerfile promises (slim, non-root, read-only friendly), that what it
installs contains all the code and migrations, and that `make images` says clearly when this
machine cannot build."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tools.deploy.layout import DOCKERFILE, REPO_ROOT
from tools.deploy.render import Manifest

from .manifests import of_kind

TEXT = DOCKERFILE.read_text()


def stages() -> list[str]:
    return re.split(r"^FROM ", TEXT, flags=re.MULTILINE)[1:]


def test_two_stages_from_a_pinned_slim_python() -> None:
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", TEXT, re.MULTILINE)
    assert default is not None
    assert re.fullmatch(r"python:3\.11[.\d]*-slim[-a-z]*@sha256:[0-9a-f]{64}", default.group(1))
    assert [s.split()[0:3] for s in stages()] == [
        ["${PYTHON_IMAGE}", "AS", "builder"],
        ["${PYTHON_IMAGE}", "AS", "runtime"],
    ]


def test_builder_installs_the_runtime_lock_then_our_packages_without_an_index() -> None:
    builder = stages()[0]
    assert "python3 -m venv /opt/venv" in builder
    # Only the wheels `make images` downloaded on the host: the `wheels` build context.
    assert re.findall(r"^COPY --from=(\S+) ", builder, re.MULTILINE) == ["wheels"]
    installs = re.findall(r"^RUN pip install .*$", builder, re.MULTILINE)
    # Every dependency comes from the runtime lock (its text is /wheels/requirements.txt),
    # checked against its hashes; our two packages bring none of their own.
    assert [line.removeprefix("RUN ") for line in installs] == [
        "pip install --no-index --find-links /wheels --require-hashes -r /wheels/requirements.txt",
        "pip install --no-index --find-links /wheels --no-deps --no-build-isolation"
        " ./contracts/python .",
    ]


def test_runtime_takes_only_the_venv_and_runs_as_the_manifests_user(
    rendered: dict[str, list[Manifest]],
) -> None:
    runtime = stages()[1]
    assert re.findall(r"^COPY .*$", runtime, re.MULTILINE) == [
        "COPY --from=builder /opt/venv /opt/venv"
    ]
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE)
    assert "PYTHONDONTWRITEBYTECODE=1" in runtime
    for deployment in of_kind(rendered["prod"], "Deployment"):
        context = deployment["spec"]["template"]["spec"]["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (10001, 10001)


def test_the_copied_sources_build_wheels_with_all_code_and_migrations(tmp_path: Path) -> None:
    # The same files the builder stage copies, built the way its pip install builds them.
    copied = re.findall(r"^COPY (?!--from)(\S+) ", stages()[0], re.MULTILINE)
    assert set(copied) == {"pyproject.toml", "contracts/python", "infra", "services"}
    context = tmp_path / "context"
    for source in copied:
        origin = REPO_ROOT / source
        if origin.is_dir():
            shutil.copytree(
                origin, context / source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
            )
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(origin, context / source)
    wheels = tmp_path / "wheels"
    for project in (context / "contracts" / "python", context):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--quiet",
                "--wheel-dir",
                str(wheels),
                str(project),
            ],
            check=True,
            capture_output=True,
            timeout=300,
            cwd=tmp_path,
        )
    packaged = set()
    for wheel in wheels.glob("*.whl"):
        packaged |= set(zipfile.ZipFile(wheel).namelist())
    # Compared with the copy, not the live tree, which other work may be changing meanwhile.
    expected = {
        str(path.relative_to(root))
        for root, patterns in (
            (context, ("infra/**/*.py", "infra/**/*.sql", "services/**/*.py", "services/**/*.sql")),
            (context / "contracts" / "python", ("snapsell/**/*.py", "snapsell/**/*.pyi")),
        )
        for pattern in patterns
        for path in root.glob(pattern)
        if not {"__pycache__", "build"} & set(path.relative_to(root).parts)
    }
    assert any(name.endswith(".sql") for name in expected)
    assert sorted(expected - packaged) == []


def test_images_without_a_container_engine_fail_with_a_clear_message(tmp_path: Path) -> None:
    # An empty PATH: no docker, podman or buildah (nor git: the tag falls back to "dev").
    result = subprocess.run(
        [sys.executable, "-m", "tools.deploy", "images", "--tag", "1.0.0"],
        cwd=REPO_ROOT,
        env={**os.environ, "PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "make images: no container engine: docker and podman are absent or their daemon does "
        "not answer (`docker info` fails), and buildah is absent; install or start one to "
        "build images"
    )


def test_images_refuse_the_latest_tag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.deploy", "images", "--tag", "latest"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "must not be 'latest'" in result.stderr


def test_only_images_on_the_official_base_are_pushed() -> None:
    command = ["images", "--tag", "1.0.0", "--base", "local", "--push"]
    result = subprocess.run(
        [sys.executable, "-m", "tools.deploy", *command],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "make images: only images on the official base are pushed"
