"""The image's dependencies, downloaded on the host: the image build installs them with
`pip install --no-index` from this directory (the Dockerfile's `wheels` build context), so a
build never reaches a package index, and no machine's index settings or certificates (pip.conf,
PIP_* variables) ever get into the image.

The directory holds wheels only (Linux, CPython 3.11, this machine's architecture), the
`requirements.txt` the build installs from, and a stamp: it is downloaded again only when the
requirements or the target change.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tools.deploy.layout import REPO_ROOT

# The pinned set: pyproject.toml's dependencies. With a lock file, this becomes its text
# (hashes included: pip then checks every wheel, at download and at install).
REQUIREMENTS_SOURCE = REPO_ROOT / "pyproject.toml"
# The build backend of the two local packages (contracts/python and the project): installed
# without an index too, so it is in the wheelhouse.
BUILD_BACKEND = "setuptools==84.2.1"
PYTHON_VERSION = "3.11"
# Both bases have glibc 2.36 or newer (Debian 12 and the official slim image on Debian 13):
# wheels for any manylinux from 2.17 (manylinux2014) to 2.36 run on them.
GLIBC_MINORS = range(17, 37)
STAMP = ".requirements.sha256"


class WheelsError(Exception):
    """A one-line reason the wheels could not be downloaded."""


def pinned_requirements() -> str:
    dependencies = tomllib.loads(REQUIREMENTS_SOURCE.read_text())["project"]["dependencies"]
    return "".join(f"{line}\n" for line in dependencies)


def _target() -> list[str]:
    return [
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        PYTHON_VERSION,
        *(f"--platform=manylinux_2_{minor}_{platform.machine()}" for minor in GLIBC_MINORS),
    ]


def ensure_wheels(directory: Path) -> Path:
    """The wheelhouse for the current pinned set, downloaded into `directory` unless it is
    already there; returns `directory`."""
    requirements = pinned_requirements()
    digest = hashlib.sha256(
        "\n".join([requirements, BUILD_BACKEND, *_target()]).encode()
    ).hexdigest()
    stamp = directory / STAMP
    if stamp.exists() and stamp.read_text() == digest:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / "requirements.txt").write_text(requirements)
    print(f"downloading the pinned wheels into {directory}")
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(directory)]
    for arguments in (
        ["-r", str(directory / "requirements.txt")],
        ["--no-deps", BUILD_BACKEND],
    ):
        if subprocess.run([*pip, *_target(), *arguments], check=False).returncode != 0:
            raise WheelsError(f"pip download of {' '.join(arguments)} failed")
    stamp.write_text(digest)
    return directory
