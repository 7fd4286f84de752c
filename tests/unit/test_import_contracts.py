"""The import contracts in pyproject.toml hold today and catch a forbidden import.

Each case copies the tree to a temporary folder, adds one import that breaks one contract and
runs `lint-imports` there: it must fail and name the broken contract.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

INDEPENDENT = "Services are independent of each other"
INFRA = "infra imports no service"
DOMAIN = "A service's domain imports neither its store, its api nor a transport"


def _copy_tree(target: Path) -> None:
    for package in ("infra", "services", "tools"):
        shutil.copytree(
            ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    result = _lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("services/live_session/api.py", "import services.routing.store", INDEPENDENT),
        ("infra/log.py", "import services.gateway.config", INFRA),
        ("services/routing/domain.py", "import asyncpg", DOMAIN),
        ("services/seller_admin/domain.py", "from services.seller_admin import store", DOMAIN),
        ("services/gateway/domain.py", "import services.gateway.api", DOMAIN),
    ],
)
def test_a_forbidden_import_fails_lint(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    _copy_tree(tmp_path)
    _append(tmp_path / module, line)
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    output = " ".join(result.stdout.split())
    assert f"{contract} BROKEN" in output, result.stdout


def test_a_new_service_is_covered_without_listing_it(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    new_service = tmp_path / "services" / "next_context"
    new_service.mkdir()
    (new_service / "__init__.py").write_text("")
    (new_service / "api.py").write_text("import services.seller_admin.store\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert f"{INDEPENDENT} BROKEN" in " ".join(result.stdout.split())
    assert "services.next_context" in result.stdout
