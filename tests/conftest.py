"""Shared fixtures: an isolated SEEDLINGS_HOME per test and small generated competitions."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "seedlings-150"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Folds, caches, runs and submissions of each test go to its own folder, never the repo's data/."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("SEEDLINGS_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def demo_master(tmp_path_factory) -> Path:
    from seedlings.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "comp", per_class=4, seed=3, max_size=300)


@pytest.fixture
def demo(demo_master, tmp_path) -> Path:
    """A private copy of a tiny demo competition (about 90 train images), free to modify."""
    dst = tmp_path / "comp"
    shutil.copytree(demo_master, dst)
    return dst


@pytest.fixture
def real() -> Path:
    if not REAL.is_dir():
        pytest.skip("../shared/data/seedlings-150 is not here")
    return REAL
