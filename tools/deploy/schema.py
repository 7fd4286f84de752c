"""Offline schema validation of the rendered manifests.

Built-in kinds are validated strictly (unknown fields are errors) with kubernetes-validate's
bundled OpenAPI schemas. Custom resources have no schema there. Those whose CRD schema is
vendored in tools/deploy/crds (KEDA's, taken verbatim from the operator's release, descriptions
removed) are validated against it, as strictly: an object the CRD declares with `properties`
accepts no other field, as the API server's strict field validation would refuse it. The
others are listed in CUSTOM_KINDS, skipped explicitly, and their essential fields are checked
by tests/deploy instead. Anything neither built-in, vendored nor listed is an error, so a new
CRD cannot slip through unvalidated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate

from tools.deploy.render import Manifest, describe

CRD_SCHEMAS_DIR = Path(__file__).parent / "crds"

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


def _strict(node: Any) -> Any:
    """The CRD schema with unknown fields refused wherever it lists an object's fields."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    strict = {
        key: (
            {name: _strict(sub) for name, sub in value.items()}
            if key == "properties"
            else _strict(value)
        )
        for key, value in node.items()
    }
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


@cache
def crd_schemas(directory: Path = CRD_SCHEMAS_DIR) -> Mapping[tuple[str, str], Any]:
    """(apiVersion, kind) -> a validator of the vendored CRD schemas (tools/deploy/crds)."""
    validators = {}
    for path in sorted(directory.glob("*.json")):
        vendored = json.loads(path.read_text())
        schema = _strict(vendored["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        validators[(vendored["apiVersion"], vendored["kind"])] = jsonschema.Draft7Validator(schema)
    return validators


def _crd_problems(doc: Manifest, validator: Any) -> list[str]:
    problems = []
    for error in validator.iter_errors(doc):
        where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        problems.append(f"{describe(doc)}: {where}: {error.message}")
    return sorted(problems)


def validate_schemas(docs: Sequence[Manifest], kubernetes_version: str) -> SchemaReport:
    problems: list[str] = []
    skipped: list[str] = []
    validated = 0
    vendored = crd_schemas()
    for doc in docs:
        validator = vendored.get((str(doc.get("apiVersion")), str(doc.get("kind"))))
        if validator is not None:
            found = _crd_problems(doc, validator)
            problems += found
            validated += not found
            continue
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
                f"{doc.get('apiVersion')} {doc.get('kind')}; if it is a custom resource, vendor "
                "its CRD schema in tools/deploy/crds, or add it to CUSTOM_KINDS in "
                "tools/deploy/schema.py and test its fields"
            )
        else:
            validated += 1
    return SchemaReport(tuple(problems), validated, tuple(skipped))
