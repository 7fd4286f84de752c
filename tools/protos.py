"""Generate the Python stubs of `protos/` into `contracts/python`, or check they are current.

python -m tools.protos generate   # rewrite contracts/python/snapsell
python -m tools.protos check      # exit 1 when the committed stubs differ from the protos
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
CONTRACTS = ROOT / "contracts" / "python"
PACKAGE = "snapsell"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write `<out_dir>/snapsell/...` from scratch: messages, gRPC stubs and their .pyi."""
    shutil.rmtree(out_dir / PACKAGE, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    plugin_dir = Path(sys.executable).parent
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    subprocess.run(command, check=True, cwd=PROTO_ROOT, capture_output=True)
    package_root = out_dir / PACKAGE
    # protoc writes a gRPC module for every file; keep it only where a service is declared.
    for proto in proto_files():
        if "\nservice " not in proto.read_text():
            stem = proto.relative_to(PROTO_ROOT).with_suffix("")
            for suffix in (".py", ".pyi"):
                (out_dir / f"{stem}_pb2_grpc{suffix}").unlink()
    for directory in [package_root, *(d for d in package_root.rglob("*") if d.is_dir())]:
        (directory / "__init__.py").touch()
    (package_root / "py.typed").touch()


def tree_contents(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def check() -> list[str]:
    """Relative paths whose committed stub is missing, extra or different from a fresh build."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = tree_contents(Path(tmp) / PACKAGE)
    committed = tree_contents(CONTRACTS / PACKAGE)
    return sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )


def main(argv: list[str]) -> int:
    if argv == ["generate"]:
        generate(CONTRACTS)
        return 0
    if argv == ["check"]:
        stale = check()
        if stale:
            print("generated stubs are stale, run `make protos`: " + ", ".join(stale))
            return 1
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
