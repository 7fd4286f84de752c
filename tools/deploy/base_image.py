"""The base of local and CI builds, which cannot pull the official Python image: a Debian 12
minbase with Debian's Python 3.11, made by mmdebstrap from Debian's package repositories.

The root filesystem tarball is cached under .state/images, named by a digest of everything that
shapes it (suite, packages, repositories, options), so it is made again exactly when one of
those changes; it is imported into the engine's local store as localhost/snapsell-base:<digest>.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Protocol

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates")
REPOSITORIES = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
OPTIONS = (
    "--variant=minbase",
    # /usr merged by the hook, not by the usrmerge package (which would bring in Perl).
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    # No documentation, manual pages or translations in an image nobody logs into.
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)
IMAGE = "localhost/snapsell-base"
# What an imported root filesystem lacks: the image configuration a Dockerfile base provides.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BaseImageError(Exception):
    """A one-line reason the local base could not be made."""


class Importer(Protocol):
    def has_image(self, reference: str) -> bool: ...

    def import_rootfs(self, tarball: Path, reference: str, path: str) -> None: ...


def digest() -> str:
    shape = "\n".join([SUITE, *PACKAGES, *REPOSITORIES, *OPTIONS])
    return hashlib.sha256(shape.encode()).hexdigest()[:16]


def make_tarball(cache_dir: Path) -> Path:
    """The cached root filesystem for the current package list, made if missing (older ones,
    made for another list, are removed)."""
    tarball = cache_dir / f"base-{digest()}.tar"
    if tarball.exists():
        return tarball
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise BaseImageError("mmdebstrap is absent: apt-get install mmdebstrap")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob("base-*.tar*"):
        stale.unlink()
    partial = tarball.with_suffix(".tar.partial")
    print(f"making the local base ({SUITE}: {', '.join(PACKAGES)}) into {tarball}")
    command = [
        mmdebstrap,
        "--quiet",
        *OPTIONS,
        f"--include={','.join(PACKAGES)}",
        "--format=tar",
        SUITE,
        str(partial),
        *REPOSITORIES,
    ]
    # stdin closed: without a tty mmdebstrap would read extra repositories from it.
    done = subprocess.run(command, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BaseImageError(f"mmdebstrap exited {done.returncode}")
    partial.rename(tarball)
    return tarball


def ensure_base(engine: Importer, cache_dir: Path) -> str:
    """The local base's reference in `engine`'s store, imported (and made) when missing."""
    reference = f"{IMAGE}:{digest()}"
    if not engine.has_image(reference):
        engine.import_rootfs(make_tarball(cache_dir), reference, PATH)
    return reference
