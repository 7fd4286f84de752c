"""Offline schema validation of the rendered manifests.

Built-in kinds are validated strictly (unknown fields are errors) with kubernetes-validate's
bundled OpenAPI schemas. Custom resources have no schema there: they are listed here, skipped
explicitly, and their essential fields are checked by tests/deploy instead. Anything neither
built-in nor listed is an error, so a new CRD cannot slip through unvalidated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import kubernetes_validate

from tools.deploy.render import Manifest, describe

CUSTOM_KINDS: frozenset[tuple[str, str]] = frozenset(
    {
        ("postgresql.cnpg.io/v1", "Cluster"),
        ("postgresql.cnpg.io/v1", "ScheduledBackup"),
        ("barmancloud.cnpg.io/v1", "ObjectStore"),
        ("security.istio.io/v1", "PeerAuthentication"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
)


@dataclass(frozen=True)
class SchemaReport:
    problems: tuple[str, ...]
    validated: int
    skipped: tuple[str, ...]


def is_custom(doc: Manifest) -> bool:
    return (str(doc.get("apiVersion")), str(doc.get("kind"))) in CUSTOM_KINDS


def validate_builtin(docs: Sequence[Manifest], kubernetes_version: str) -> SchemaReport:
    problems: list[str] = []
    skipped: list[str] = []
    validated = 0
    for doc in docs:
        if is_custom(doc):
            skipped.append(describe(doc))
            continue
        try:
            kubernetes_validate.validate(doc, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path) or "(top level)"
            problems.append(f"{describe(doc)}: {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(
                f"{describe(doc)}: no Kubernetes {kubernetes_version} schema for "
                f"{doc.get('apiVersion')} {doc.get('kind')}; if it is a custom resource, "
                "add it to CUSTOM_KINDS in tools/deploy/schema.py and test its fields"
            )
        else:
            validated += 1
    return SchemaReport(tuple(problems), validated, tuple(skipped))
