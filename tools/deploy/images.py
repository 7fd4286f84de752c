"""`make images`: build (and optionally push) the one application image with whatever
container engine this machine has: docker or podman (a running daemon/service) or buildah.

Two bases, one Dockerfile: `official` (the pinned python slim image production ships) or
`local` (a Debian 12 base made here, tools/deploy/base_image.py, for machines that cannot pull
it). Either way the dependencies come from wheels downloaded on the host (tools/deploy/wheels.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tools.deploy import base_image, wheels
from tools.deploy.layout import DOCKERFILE, REPO_ROOT, STATE_DIR

_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

OFFICIAL_BASE, LOCAL_BASE = "official", "local"
# The image the services run from, all layers uncompressed; the image test holds it to this.
SIZE_BUDGET_BYTES = 350 * 1000 * 1000


class ImageError(Exception):
    """A one-line reason the image cannot be built, tagged or pushed here."""


@dataclass(frozen=True)
class Engine:
    name: str
    executable: str

    def build_command(
        self, reference: str, build_args: Mapping[str, str], contexts: Mapping[str, Path]
    ) -> list[str]:
        # buildah: no daemon, runs as root in a chroot; layers cached like docker's.
        verb = ["build"] if self.name != "buildah" else ["build", "--layers", "--isolation=chroot"]
        options = [f"--build-arg={name}={value}" for name, value in build_args.items()]
        options += [f"--build-context={name}={path}" for name, path in contexts.items()]
        return [
            self.executable,
            *verb,
            *options,
            "-f",
            str(DOCKERFILE),
            "-t",
            reference,
            str(REPO_ROOT),
        ]

    def push_command(self, reference: str) -> list[str]:
        return [self.executable, "push", reference]

    def has_image(self, reference: str) -> bool:
        if self.name == "buildah":
            return _answers([self.executable, "inspect", "--type", "image", reference])
        return _answers([self.executable, "image", "inspect", reference])

    def import_rootfs(self, tarball: Path, reference: str, path: str) -> None:
        """A root filesystem tarball as a local image with `path` as its PATH."""
        print(f"importing {tarball.name} as {reference}")
        if self.name != "buildah":
            _run(
                [self.executable, "import", "--change", f"ENV PATH={path}", str(tarball), reference]
            )
            return
        container = _run([self.executable, "from", "scratch"]).strip()
        try:
            _run([self.executable, "add", "--quiet", container, str(tarball), "/"])
            _run([self.executable, "config", "--env", f"PATH={path}", container])
            _run([self.executable, "commit", "--quiet", container, reference])
        finally:
            _run([self.executable, "rm", container])

    def describe(self, reference: str) -> BuiltImage:
        if self.name == "buildah":
            found = json.loads(_run([self.executable, "inspect", "--type", "image", reference]))
            layers = json.loads(found["Manifest"])["layers"]
            # buildah stores layers uncompressed, so this is the size on disk.
            size = sum(int(layer["size"]) for layer in layers)
            return BuiltImage(reference, found["FromImageID"], size)
        shown = _run(
            [self.executable, "image", "inspect", "--format", "{{.Id}} {{.Size}}", reference]
        )
        image_id, size = shown.split()
        return BuiltImage(reference, image_id.removeprefix("sha256:"), int(size))


@dataclass(frozen=True)
class BuiltImage:
    reference: str
    image_id: str
    size_bytes: int

    def summary(self) -> str:
        budget = SIZE_BUDGET_BYTES / 1e6
        return (
            f"built {self.reference}: id {self.image_id[:12]}, "
            f"{self.size_bytes / 1e6:.0f} MB (budget {budget:.0f} MB)"
        )


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageError(f"{' '.join(command[:2])} failed: {reason}")
    return done.stdout


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


def build(engine: Engine, reference: str, base: str = LOCAL_BASE) -> BuiltImage:
    """Build `reference` on the `official` or the `local` base; what was built."""
    if base not in (OFFICIAL_BASE, LOCAL_BASE):
        raise ImageError(f"IMAGE_BASE {base!r} is neither {OFFICIAL_BASE} nor {LOCAL_BASE}")
    try:
        wheelhouse = wheels.ensure_wheels(STATE_DIR / "wheels")
        build_args = {}
        if base == LOCAL_BASE:
            # The Dockerfile's default is the official base.
            build_args["PYTHON_IMAGE"] = base_image.ensure_base(engine, STATE_DIR)
    except (wheels.WheelsError, base_image.BaseImageError) as error:
        raise ImageError(str(error)) from error
    print(f"building {reference} on the {base} base with {engine.name}")
    command = engine.build_command(reference, build_args, {"wheels": wheelhouse})
    if subprocess.run(command, check=False).returncode != 0:
        raise ImageError(f"{engine.name} build of {reference} failed")
    return engine.describe(reference)


def push(engine: Engine, reference: str) -> None:
    print(f"pushing {reference}")
    if subprocess.run(engine.push_command(reference), check=False).returncode != 0:
        raise ImageError(f"{engine.name} push of {reference} failed (logged in to the registry?)")
