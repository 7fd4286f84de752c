"""Every dependency, transitive ones included, is installed from a lock that pins it with the
hashes of its files: the runtime lock (the image) and the dev lock (make). The locks must stay
in step with pyproject.toml: a pin changed in one and not the other fails here (`make lock`)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
PYPROJECTS = (ROOT / "pyproject.toml", ROOT / "contracts" / "python" / "pyproject.toml")

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def locked(text: str) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) for each entry of a hash-pinned lock."""
    entries = re.split(r"^(?=[A-Za-z0-9])", text, flags=re.MULTILINE)
    pins: dict[str, tuple[str, int]] = {}
    for entry in entries:
        pin = _PIN.match(entry)
        if pin:
            pins[canonicalize_name(pin.group(1))] = (pin.group(2), len(_HASH.findall(entry)))
    return pins


def requirements(pyproject: str, *, dev: bool) -> list[Requirement]:
    project = tomllib.loads(pyproject)
    declared = list(project["project"].get("dependencies", []))
    if dev:
        declared += project["project"].get("optional-dependencies", {}).get("dev", [])
    declared += project.get("build-system", {}).get("requires", [])
    return [Requirement(text) for text in declared]


def out_of_step(pyprojects: list[str], lock: str, *, dev: bool) -> list[str]:
    """What in `pyprojects` the `lock` does not satisfy, one line each (empty: in step)."""
    pins = locked(lock)
    problems = []
    for pyproject in pyprojects:
        for requirement in requirements(pyproject, dev=dev):
            name = canonicalize_name(requirement.name)
            if name not in pins:
                problems.append(f"{requirement} is not in the lock")
            elif not requirement.specifier.contains(pins[name][0], prereleases=True):
                problems.append(f"{requirement} but the lock has {name}=={pins[name][0]}")
    return problems


def pyproject_texts() -> list[str]:
    return [path.read_text() for path in PYPROJECTS]


def test_runtime_lock_has_every_runtime_pin_at_the_same_version() -> None:
    assert out_of_step(pyproject_texts(), RUNTIME_LOCK.read_text(), dev=False) == []


def test_dev_lock_has_every_runtime_and_dev_pin_at_the_same_version() -> None:
    assert out_of_step(pyproject_texts(), DEV_LOCK.read_text(), dev=True) == []


def test_dev_lock_keeps_every_version_of_the_runtime_lock() -> None:
    runtime, dev = locked(RUNTIME_LOCK.read_text()), locked(DEV_LOCK.read_text())
    assert {name: dev.get(name, ("missing", 0))[0] for name in runtime} == {
        name: version for name, (version, _) in runtime.items()
    }


def test_every_locked_package_is_pinned_with_hashes() -> None:
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        text = lock.read_text()
        pins = locked(text)
        assert len(pins) > 40, lock.name
        assert [name for name, (_, hashes) in pins.items() if hashes == 0] == [], lock.name
        # Nothing pip would take from elsewhere than the index, unchecked.
        assert not re.search(r"^\s*(-e|--editable|--index-url|--extra-index-url|-f)\b", text, re.M)


def test_a_pin_changed_in_pyproject_alone_is_reported() -> None:
    root, contracts = pyproject_texts()
    pin = re.search(r'"starlette==([\d.]+)"', root)
    assert pin is not None
    bumped = root.replace(pin.group(0), '"starlette==0.0.1"')
    added = root.replace(pin.group(0), f'{pin.group(0)},\n  "left-pad==1.0"')
    lock = RUNTIME_LOCK.read_text()
    assert out_of_step([bumped, contracts], lock, dev=False) == [
        f"starlette==0.0.1 but the lock has starlette=={pin.group(1)}"
    ]
    assert out_of_step([added, contracts], lock, dev=False) == ["left-pad==1.0 is not in the lock"]
