"""`make images`: build (and optionally push) the one application image with whatever
container engine this machine has: docker or podman (a running daemon/service) or buildah."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from tools.deploy.layout import DOCKERFILE, REPO_ROOT

_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class ImageError(Exception):
    """A one-line reason the image cannot be built, tagged or pushed here."""


@dataclass(frozen=True)
class Engine:
    name: str
    executable: str

    def build_command(self, reference: str) -> list[str]:
        verb = ["build"] if self.name != "buildah" else ["build", "--layers"]
        return [self.executable, *verb, "-f", str(DOCKERFILE), "-t", reference, str(REPO_ROOT)]

    def push_command(self, reference: str) -> list[str]:
        return [self.executable, "push", reference]


def _answers(command: list[str]) -> bool:
    try:
        result = subprocess.run(command, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def detect_engine() -> Engine | None:
    """The first engine that can actually build: a docker client alone is not enough, its
    daemon must answer (`docker info`)."""
    for name in ("docker", "podman", "buildah"):
        executable = shutil.which(name)
        if executable and _answers([executable, "info"]):
            return Engine(name, executable)
    return None


NO_ENGINE = (
    "no container engine: docker and podman are absent or their daemon does not answer "
    "(`docker info` fails), and buildah is absent; install or start one to build images"
)


def check_tag(tag: str) -> str:
    if tag == "latest":
        raise ImageError("IMAGE_TAG must not be 'latest': deploy an immutable tag")
    if not _TAG.match(tag):
        raise ImageError(f"IMAGE_TAG {tag!r} is not a valid image tag")
    return tag


def default_tag() -> str:
    """The git revision (with -dirty for uncommitted changes), or 'dev' outside git."""
    git = shutil.which("git")
    if git is None:
        return "dev"
    revision = subprocess.run(
        [git, "rev-parse", "--short=12", "HEAD"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if revision.returncode != 0:
        return "dev"
    status = subprocess.run(
        [git, "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    dirty = "-dirty" if status.stdout.strip() else ""
    return revision.stdout.strip() + dirty


def build(engine: Engine, reference: str) -> None:
    print(f"building {reference} with {engine.name} ({DOCKERFILE.relative_to(REPO_ROOT)})")
    if subprocess.run(engine.build_command(reference), check=False).returncode != 0:
        raise ImageError(f"{engine.name} build of {reference} failed")


def push(engine: Engine, reference: str) -> None:
    print(f"pushing {reference}")
    if subprocess.run(engine.push_command(reference), check=False).returncode != 0:
        raise ImageError(f"{engine.name} push of {reference} failed (logged in to the registry?)")
