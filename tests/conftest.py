"""Shared fixtures: an isolated SEEDLINGS_HOME per test and small generated competitions."""

import contextlib
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
    from seedlings.data.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "comp", per_class=4, seed=3, max_size=300)


@pytest.fixture
def demo(demo_master, tmp_path) -> Path:
    """A private copy of a tiny demo competition (about 90 train images), free to modify."""
    dst = tmp_path / "comp"
    shutil.copytree(demo_master, dst)
    return dst


@pytest.fixture
def real() -> Path:
    """The shared folder of real seedling photos (never copied into the repo); tests that need it skip without it."""
    if not REAL.is_dir():
        pytest.skip("../shared/data/seedlings-150 is not here")
    return REAL


TINY = [
    "model=test_efficientnet",
    "pretrained=none",
    "bn_stats=batch",  # no pretrained statistics to keep
    "train_folds=0",  # every fold (the CLI's default recipe, configs/cpu.yaml, trains two)
    "crop_scale=0.35",
    "optimizer=sgd",  # the tests were tuned on the defaults of their time: SGD, L2 1e-4, 8 dihedral features
    "weight_decay=1e-4",
    "precompute_d4=true",
    "batch_size=16",
    "num_workers=0",
    "drop_rate=0.1",
    "layer_groups=3",  # the CLI's default recipe cuts Lite2 into 5 and masks and mixes its images: not here
    "plant_mask=none",
    "mixup_alpha=0",
    "cutmix_alpha=0",
    "stages=[{size: 32, freeze: true, precompute: true, lr: 0.05, n_cycles: 1, cycle_len: 1, cycle_mult: 1},"
    " {size: 32, freeze: false, lr: [0.001, 0.003, 0.01], n_cycles: 2, cycle_len: 1, cycle_mult: 2},"
    " {size: 40, freeze: false, lr: {max: 0.01, mult: 3}, n_cycles: 2, cycle_len: 1, cycle_mult: 1}]",
    "tta=flip",
]


DEFAULTS = str(Path(__file__).with_name("defaults.yaml"))  # --config for the CLI: the recipe defaults


def tiny_recipe(*extra):
    from seedlings.recipe.load import load_recipe

    return load_recipe(None, [*TINY, *extra])


def tiny_run(data, name: str = "tiny", *extra: str, n_folds: int = 3):
    """A run of the tiny recipe (with `extra` overrides) on `data`, opened as the CLI opens one."""
    from seedlings.run import open_run

    return open_run(name, data, tiny_recipe(*extra), n_folds)


class Interrupted(Exception):
    """Raised by stop_after's hook: a fold stopped from inside, as a kill would stop it, checkpoint written."""


def stop_after(rows: int):
    """An on_epoch hook for train_fold that raises Interrupted after that many SGDR epochs."""
    seen = []

    def hook(row: dict) -> None:
        seen.append(row)
        if len(seen) == rows:
            raise Interrupted

    return hook


@contextlib.contextmanager
def seedlings_home(path: Path):
    """SEEDLINGS_HOME set to `path` for a block (a fixture wider than one test, which `home` cannot serve)."""
    old = os.environ.get("SEEDLINGS_HOME")
    os.environ["SEEDLINGS_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("SEEDLINGS_HOME")
        else:
            os.environ["SEEDLINGS_HOME"] = old


@pytest.fixture(scope="session")
def trained_fold(demo_master, tmp_path_factory):
    """One fold of the tiny recipe trained once per session on the demo (3 folds): shared by several tests."""
    import math

    import numpy as np

    from seedlings.data.folds import load_folds

    home = tmp_path_factory.mktemp("trained-home")
    with seedlings_home(home):
        from seedlings.train.fit import train_fold

        run = tiny_run(demo_master)
        recipe = run.recipe
        final = train_fold(run, 0)
        n_train = int((load_folds(demo_master, 3, 0).fold != 0).sum())
    steps = [math.ceil(n_train * (8 if s.precompute else 1) / recipe.batch_size) for s in recipe.stages]
    assert n_train % recipe.batch_size != 0  # the test wants a short last batch
    return {
        "recipe": recipe,
        "run": run,
        "final": final,
        "home": home,
        "dir": home / "runs" / "tiny" / "fold0",
        "steps_per_epoch": steps,
        "n_train": n_train,
        "np": np,
    }
