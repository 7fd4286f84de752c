"""Installations: one directory per cluster, made from deploy/installation-template, holding
that installation's own values (public host, image repository, backup bucket) on top of the prod
overlay. They live in deploy/installations/<name>/, which git ignores, so the tracked overlays
keep their `change-me` placeholders and nobody forks the repository to deploy.

`placeholder_sources` says, for each placeholder left in a rendered overlay, which file sets it.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from tools.deploy.layout import (
    DEPLOY_DIR,
    INSTALLATION_TEMPLATE,
    INSTALLATIONS,
    OVERLAYS,
    PLACEHOLDER_MARK,
    REPO_ROOT,
)

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
# A placeholder value as it appears in YAML: up to quotes, spaces, commas and braces.
_TOKEN = re.compile(r"[^\s'\",{}\[\]=]*" + re.escape(PLACEHOLDER_MARK) + r"[^\s'\",{}\[\]]*")


class InstallationError(Exception):
    """A one-line reason an installation cannot be created."""


@dataclass(frozen=True)
class Values:
    """What `make deploy-init` fills in; empty keeps the template's placeholder."""

    host: str = ""
    image_repo: str = ""
    backup_path: str = ""


# (the value, its placeholder in the template, what replaces it)
_REPLACEMENTS = (
    ("image_repo", "newName: registry.change-me.example/snapsell/messaging", "newName: {}"),
    ("host", "https://messaging.change-me.example", "https://{}"),
    ("host", "value: messaging.change-me.example", "value: {}"),
    ("backup_path", "value: s3://change-me-backup-bucket/snapsell-pg", "value: {}"),
)


def installation_dir(name: str, deploy_dir: Path = DEPLOY_DIR) -> Path:
    return deploy_dir / INSTALLATIONS / name


def environment_dir(name: str, deploy_dir: Path = DEPLOY_DIR) -> Path | None:
    """The directory `make deploy ENV=name` renders: a tracked overlay or an installation."""
    if name in OVERLAYS:
        return deploy_dir / "overlays" / name
    directory = installation_dir(name, deploy_dir)
    if _NAME.fullmatch(name) and (directory / "kustomization.yaml").is_file():
        return directory
    return None


def create(name: str, values: Values, deploy_dir: Path = DEPLOY_DIR) -> Path:
    """Copy the template to deploy/installations/NAME with the values given; never overwrites."""
    if not _NAME.fullmatch(name) or name in OVERLAYS:
        raise InstallationError(
            "NAME must be lowercase letters, digits and '-' (at most 40), and not "
            f"{' or '.join(OVERLAYS)} (got {name!r})"
        )
    target = installation_dir(name, deploy_dir)
    if target.exists():
        raise InstallationError(f"{shown(target)} already exists; edit it, or remove it first")
    _check_values(values)
    shutil.copytree(deploy_dir / INSTALLATION_TEMPLATE, target)
    kustomization = target / "kustomization.yaml"
    text = kustomization.read_text()
    for field, placeholder, replacement in _REPLACEMENTS:
        value = getattr(values, field)
        if value:
            text = text.replace(placeholder, replacement.format(value))
    kustomization.write_text(text)
    return target


# (field, its make variable, the form it must have, what that means)
_VALUE_FORMS = (
    ("host", "HOST", r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", "a DNS name, e.g. messaging.example.com"),
    ("image_repo", "IMAGE_REPO", r"[a-z0-9][a-z0-9._/-]*(:[0-9]+/[a-z0-9._/-]+)?", "a repository"),
    ("backup_path", "BACKUP_PATH", r"s3://[a-z0-9][a-z0-9.-]*/\S*", "an s3:// URL"),
)


def _check_values(values: Values) -> None:
    for field, variable, form, meaning in _VALUE_FORMS:
        value = getattr(values, field)
        if value and not re.fullmatch(form, value):
            raise InstallationError(f"{variable} must be {meaning} (got {value!r})")


def placeholder_sources(stream: str, directory: Path) -> list[str]:
    """Each rendered line that still holds a placeholder, with the file to change: the
    outermost kustomization directory (from DIRECTORY down to the base) whose files set it."""
    chain = _kustomization_chain(directory)
    found = []
    for line in sorted({line.strip() for line in stream.splitlines() if PLACEHOLDER_MARK in line}):
        files: list[str] = []
        for token in _TOKEN.findall(line):
            files += [f for f in _files_setting(token, chain) if f not in files]
        found.append(f"{line}  ({', '.join(files) or 'not found in the overlay files'})")
    return found


def _kustomization_chain(directory: Path) -> list[Path]:
    """DIRECTORY, then the kustomization directories it builds on, outermost first."""
    chain: list[Path] = []
    pending = [directory.resolve()]
    while pending:
        current = pending.pop(0)
        if current in chain or not (current / "kustomization.yaml").is_file():
            continue
        chain.append(current)
        kustomization = yaml.safe_load((current / "kustomization.yaml").read_text()) or {}
        pending += [(current / str(r)).resolve() for r in kustomization.get("resources", [])]
    return chain


def _files_setting(token: str, chain: list[Path]) -> list[str]:
    # An image is set by repository; its tag comes from `make deploy`.
    repository, colon, tag = token.rpartition(":")
    if colon and "/" not in tag and "/" in repository:
        token = repository
    whole = re.compile(r"(?<![\w/:.-])" + re.escape(token) + r"(?![\w.-])")
    for directory in chain:
        files = [
            shown(path)
            for path in sorted(directory.iterdir())
            if path.is_file() and whole.search(path.read_text(errors="replace"))
        ]
        if files:
            return files
    return []


def shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
