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
from pathlib import Path

from tools.deploy.layout import REPO_ROOT

# The pinned set: the runtime lock, hashes included (pip checks every wheel against them, at
# download and at install). It pins setuptools too, the build backend of our two packages.
REQUIREMENTS_SOURCE = REPO_ROOT / "requirements.lock"
PYTHON_VERSION = "3.11"
# Both bases have glibc 2.36 or newer (Debian 12 and the official slim image on Debian 13):
# wheels for any manylinux from 2.17 (manylinux2014) to 2.36 run on them.
GLIBC_MINORS = range(17, 37)
STAMP = ".requirements.sha256"


class WheelsError(Exception):
    """A one-line reason the wheels could not be downloaded."""


def pinned_requirements() -> str:
    return REQUIREMENTS_SOURCE.read_text()


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
    digest = hashlib.sha256("\n".join([requirements, *_target()]).encode()).hexdigest()
    stamp = directory / STAMP
    if stamp.exists() and stamp.read_text() == digest:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / "requirements.txt").write_text(requirements)
    print(f"downloading the pinned wheels into {directory}")
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(directory)]
    requirements_file = directory / "requirements.txt"
    if subprocess.run([*pip, *_target(), "-r", str(requirements_file)], check=False).returncode:
        raise WheelsError(f"pip download of {REQUIREMENTS_SOURCE.name} failed")
    stamp.write_text(digest)
    return directory
