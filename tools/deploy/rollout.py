"""`make deploy ENV=local|prod IMAGE_TAG=...`: render the overlay with the image tag, show
what will be applied, then (cluster permitting) build and ship the image and apply."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tools.deploy import cluster
from tools.deploy.images import ImageError, build, check_tag, default_tag, detect_engine
from tools.deploy.installation import environment_dir, placeholder_sources
from tools.deploy.layout import DEPLOY_DIR, OVERLAYS, PLACEHOLDER_MARK, RENDER_DIR, REPO_ROOT
from tools.deploy.render import (
    Manifest,
    RenderError,
    kubectl_path,
    overlay_image_name,
    parse,
    render_with_image,
    summary,
)


class DeployError(Exception):
    """A one-line reason `make deploy` stops before changing anything."""


@dataclass(frozen=True)
class Release:
    environment: str
    repository: str
    tag: str
    rendered: Path
    stream: str
    docs: tuple[Manifest, ...]
    directory: Path

    @property
    def image(self) -> str:
        return f"{self.repository}:{self.tag}"


def plan(
    environment: str,
    tag: str | None,
    repository: str | None,
    render_dir: Path = RENDER_DIR,
    deploy_dir: Path = DEPLOY_DIR,
) -> Release:
    """Render ENVIRONMENT's overlay (or installation) with the image to deploy and write it to
    RENDER_DIR."""
    overlay = environment_dir(environment, deploy_dir)
    if overlay is None:
        raise DeployError(
            f"ENV must be one of {', '.join(OVERLAYS)} or an installation made by "
            f"`make deploy-init NAME=...` (got {environment!r})"
        )
    if not tag:
        if environment != "local":
            raise DeployError(
                f"IMAGE_TAG is required for {environment}: the immutable tag of an image "
                "already built"
            )
        tag = default_tag()
    try:
        check_tag(tag)
    except ImageError as error:
        raise DeployError(str(error)) from error
    repository = repository or overlay_image_name(overlay)
    try:
        stream = render_with_image(overlay, repository, tag)
    except RenderError as error:
        raise DeployError(str(error)) from error
    render_dir.mkdir(parents=True, exist_ok=True)
    rendered = render_dir / f"{environment}.yaml"
    rendered.write_text(stream)
    return Release(environment, repository, tag, rendered, stream, tuple(parse(stream)), overlay)


def placeholders(stream: str) -> list[str]:
    return sorted({line.strip() for line in stream.splitlines() if PLACEHOLDER_MARK in line})


def show(release: Release) -> None:
    namespaces = sorted({str(d.get("metadata", {}).get("namespace", "")) for d in release.docs})
    print(
        f"{release.environment}: {len(release.docs)} objects for namespace "
        f"{', '.join(n for n in namespaces if n)}, image {release.image}"
    )
    for line in summary(release.docs):
        print(f"  {line}")
    print(f"rendered manifests: {_shown(release.rendered)}")


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def deploy(
    environment: str,
    tag: str | None,
    repository: str | None,
    render_dir: Path = RENDER_DIR,
    deploy_dir: Path = DEPLOY_DIR,
) -> int:
    try:
        release = plan(environment, tag, repository, render_dir, deploy_dir)
    except DeployError as error:
        return _fail(str(error))
    show(release)
    left = placeholder_sources(release.stream, release.directory)
    if left:
        lines = "\n".join(f"  {line}" for line in left)
        where = (
            "set them in the files named"
            if environment not in OVERLAYS
            else "keep this installation's values out of the repository: "
            "`make deploy-init NAME=<name> HOST=... IMAGE_REPO=... BACKUP_PATH=...` writes "
            "deploy/installations/<name>/ (git-ignored) from deploy/installation-template, "
            "then `make deploy ENV=<name>`"
        )
        return _fail(
            f"installation-specific values still hold '{PLACEHOLDER_MARK}' placeholders "
            f"(IMAGE_REPO replaces the image's); {where}:\n{lines}"
        )
    kubectl = kubectl_path()
    later = (
        f"nothing was applied. The objects above are in {_shown(release.rendered)}: "
        "`kubectl apply -f` it once a cluster is reachable, or run `make deploy` again."
    )
    where = cluster.target(kubectl)
    if where is None:
        return _fail(
            f"no kubectl context is set ({cluster.kubeconfig_source()}), so no cluster was "
            "tried (kubectl's fallback, localhost:8080, is where `make run`'s gateway listens); "
            f"pick one with `kubectl config use-context NAME`; {later}"
        )
    reason = cluster.unreachable_reason(kubectl)
    if reason is not None:
        return _fail(
            f"no reachable Kubernetes cluster at {where.server} (kubectl context "
            f"'{where.context}', {cluster.kubeconfig_source()}): {reason}; {later}"
        )
    return _ship(kubectl, release)


def _ship(kubectl: str, release: Release) -> int:
    context = cluster.current_context(kubectl)
    print(f"kubectl context: {context or '(default)'}")
    missing = cluster.missing_prerequisites(kubectl, release.docs)
    if missing:
        return _fail(
            "the cluster lacks: "
            + "; ".join(missing)
            + " (docs/OPERATIONS.md, 'Cluster prerequisites')"
        )
    engine = detect_engine()
    try:
        if engine is None:
            print(
                f"no container engine here: skipping the build; {release.image} must already "
                "be in the registry"
            )
        else:
            build(engine, release.image)
            cluster.deliver_image(engine, release.image, context)
    except ImageError as error:
        return _fail(str(error))
    if not cluster.replace_jobs(kubectl, release.docs):
        return _fail("could not delete the previous release's migrations Job")
    if not cluster.apply(kubectl, release.rendered):
        return _fail("kubectl apply failed; see its output above")
    if not cluster.wait_for_rollout(kubectl, release.docs):
        return _fail(
            "the rollout did not complete (`kubectl -n snapsell logs job/snapsell-migrate "
            "--all-containers` for the migrations); `kubectl rollout undo` rolls a Deployment back"
        )
    print(f"deployed {release.image} to {release.environment}")
    return 0


def _fail(message: str) -> int:
    print(f"make deploy: {message}", file=sys.stderr)
    return 1


def render_only(
    environment: str, tag: str | None, repository: str | None, render_dir: Path = RENDER_DIR
) -> int:
    try:
        release = plan(environment, tag, repository, render_dir)
    except DeployError as error:
        return _fail(str(error))
    sys.stdout.write(release.stream)
    return 0
