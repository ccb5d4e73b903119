"""Every path the pipeline writes derives from here: the repo root (or $SEEDLINGS_HOME) and the run name."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def root() -> Path:
    """Where data/, runs/ and submissions/ live; tests point $SEEDLINGS_HOME at a temporary folder."""
    return Path(os.environ.get("SEEDLINGS_HOME", REPO))


def folds_dir() -> Path:
    return root() / "data" / "folds"


def cache_dir() -> Path:
    return root() / "data" / "cache"


def raw_dir() -> Path:
    return root() / "data" / "raw"


def run_dir(run: str) -> Path:
    return root() / "runs" / run


def fold_dir(run: str, fold: int) -> Path:
    return run_dir(run) / f"fold{fold}"


def full_dir(run: str) -> Path:
    """The model trained on every training image (full_fit), beside the folds."""
    return run_dir(run) / "full"


def submissions_dir() -> Path:
    return root() / "submissions"


def submission_path(run: str) -> Path:
    """A run's submission CSV; its provenance is the .json beside it."""
    return submissions_dir() / f"{run}.csv"
