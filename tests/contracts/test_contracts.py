"""The v1 contracts: lint-clean, formatted, not broken against the released baseline, and the
committed Python stubs match them — and each check fails on a broken proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools import protos

ROOT = Path(__file__).resolve().parents[2]
BUF = str(Path(sys.executable).parent / "buf")
BASELINE = ROOT / "protos" / "baseline.binpb"


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BUF, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of the buf module to break on purpose."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def test_protos_pass_lint() -> None:
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_protos_are_formatted() -> None:
    result = buf("format", "--diff", "--exit-code")
    assert result.returncode == 0, result.stdout


def test_protos_keep_compatibility_with_the_released_baseline() -> None:
    result = buf("breaking", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_stubs_are_current() -> None:
    assert protos.check() == [], "run `make protos`"


def test_lint_fails_on_a_badly_named_enum(workspace: Path) -> None:
    proto = workspace / "protos/snapsell/common/v1/address.proto"
    proto.write_text(proto.read_text().replace("CHANNEL_UNSPECIFIED = 0", "CHANNEL_NONE = 0"))
    result = buf("lint", cwd=workspace)
    assert result.returncode != 0
    assert "CHANNEL_NONE" in result.stdout


def test_breaking_fails_when_a_field_changes_type(workspace: Path) -> None:
    proto = workspace / "protos/snapsell/gateway/v1/events.proto"
    proto.write_text(proto.read_text().replace("  string body = 6;", "  bytes body = 6;"))
    result = buf("breaking", "--against", str(BASELINE), cwd=workspace)
    assert result.returncode != 0
    assert "body" in result.stdout


def test_format_check_fails_on_misformatted_proto(workspace: Path) -> None:
    proto = workspace / "protos/snapsell/common/v1/address.proto"
    proto.write_text(proto.read_text().replace("message Address {", "message   Address{"))
    assert buf("format", "--diff", "--exit-code", cwd=workspace).returncode != 0


def test_stub_check_notices_a_stale_stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "python"
    shutil.copytree(protos.CONTRACTS, copy)
    stub = copy / "snapsell/common/v1/address_pb2.pyi"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    monkeypatch.setattr(protos, "CONTRACTS", copy)
    assert protos.check() == ["common/v1/address_pb2.pyi"]


def test_stubs_build_as_an_installable_wheel_with_type_stubs(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(protos.CONTRACTS),
        ],
        check=True,
        timeout=120,
    )
    [wheel] = tmp_path.glob("snapsell_contracts-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "snapsell/gateway/v1/events_pb2.py" in names
    assert "snapsell/gateway/v1/events_pb2.pyi" in names
    assert "snapsell/py.typed" in names
