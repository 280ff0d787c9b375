"""Shared fixtures: tiny random models written from a config, and a CLI runner."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from models import make_tiny_model


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep fdec's and ONNX Runtime's caches out of the user's home folder."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("FDEC_CACHE_DIR", str(cache / "fdec"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A factory returning the folder of a tiny random model of a family (made once)."""
    made: dict[str, pathlib.Path] = {}

    def get(family: str) -> pathlib.Path:
        if family not in made:
            made[family] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return made[family]

    return get


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()
