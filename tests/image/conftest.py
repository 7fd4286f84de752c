"""The image built once for this package (on the local base, with the code `make images` runs),
the rendered base manifests that name its commands, and a runner for its containers."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.image.containers import BUILDAH, ImageRunner
from tests.image.manifests import app_containers, writable_mounts
from tools.deploy import images
from tools.deploy.layout import APP_IMAGE, DEPLOY_DIR, REPO_ROOT
from tools.deploy.render import Manifest, parse, render

# Built over the same tag each run (buildah's layer cache makes a rebuild take seconds), one
# per checkout, as checkouts on one machine share its image store.
REFERENCE = f"{APP_IMAGE}:image-test-{hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:8]}"


@pytest.fixture(scope="package")
def built() -> images.BuiltImage:
    missing = [tool for tool in ("buildah", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} absent: apt-get install buildah mmdebstrap")
    started = time.monotonic()
    built = images.build(images.Engine("buildah", BUILDAH), REFERENCE, images.LOCAL_BASE)
    print(f"\n{built.summary()} in {time.monotonic() - started:.0f} s")
    return built


@pytest.fixture(scope="package")
def manifests() -> list[Manifest]:
    return parse(render(DEPLOY_DIR / "base"))


@pytest.fixture(scope="package")
def manifest_user(manifests: list[Manifest]) -> str:
    """The one uid:gid every pod running the app image declares."""
    users = {
        f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
        for _, pod, _ in app_containers(manifests)
    }
    assert len(users) == 1, users
    return users.pop()


@pytest.fixture(scope="package")
def runner(
    built: images.BuiltImage,
    manifests: list[Manifest],
    manifest_user: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ImageRunner]:
    runner = ImageRunner(
        built.reference,
        manifest_user,
        tmp_path_factory.mktemp("image"),
        writable=writable_mounts(manifests),
    )
    try:
        yield runner
    finally:
        runner.remove_containers()
