"""Where things are and what they are called: the paths and names the deploy tooling and its
tests agree on."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
DOCKERFILE = DEPLOY_DIR / "Dockerfile"
OPERATIONS_DOC = REPO_ROOT / "docs" / "OPERATIONS.md"
# Rendered manifests land here (git-ignored), so what `make deploy` applies can be read.
RENDER_DIR = REPO_ROOT / "build" / "deploy"
# What image builds cache between runs (git-ignored): the local base, the downloaded wheels.
STATE_DIR = REPO_ROOT / ".state" / "images"

OVERLAYS: tuple[str, ...] = ("local", "prod")

# The one image every service runs (`python -m services.<name>`), as named in deploy/base.
APP_IMAGE = "snapsell/messaging"

# The oldest Kubernetes release the manifests must be valid for.
KUBERNETES_VERSION = "1.32.0"

# Installation-specific values in the overlays contain this; `deploy` refuses to apply them.
PLACEHOLDER_MARK = "change-me"


# The per-installation overlays (git-ignored) and the tracked template they are made from.
INSTALLATIONS = "installations"
INSTALLATION_TEMPLATE = "installation-template"


def overlay_dir(name: str, deploy_dir: Path = DEPLOY_DIR) -> Path:
    return deploy_dir / "overlays" / name
