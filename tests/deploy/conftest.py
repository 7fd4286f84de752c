"""Rendered overlays, shared by the deploy tests: rendered once per run (kustomize through the
virtualenv's kubectl), handed out as fresh deep copies so a test may mutate its own."""

from __future__ import annotations

import copy

import pytest

from tools.deploy.layout import OVERLAYS, overlay_dir
from tools.deploy.render import Manifest, parse, render

Rendered = dict[str, list[Manifest]]


@pytest.fixture(scope="session")
def _rendered_once() -> Rendered:
    return {name: parse(render(overlay_dir(name))) for name in OVERLAYS}


@pytest.fixture
def rendered(_rendered_once: Rendered) -> Rendered:
    return copy.deepcopy(_rendered_once)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(_rendered_once: Rendered, overlay: str) -> list[Manifest]:
    return copy.deepcopy(_rendered_once[overlay])
