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


def probs_dir(run: str, variant: str = "") -> Path:
    """A run's probabilities: its own in probs/, those of a prediction variant (other prediction or blend keys than
    the run recorded, named by them: `tta=d4+scales`) in probs/<variant>/."""
    return run_dir(run) / "probs" / variant if variant else run_dir(run) / "probs"


def variant_name(keys: dict) -> str:
    """`predict_size=224,tta=d4+scales`: a variant's folder name, its keys sorted ("" for none)."""
    return ",".join(f"{k}={v}" for k, v in sorted(keys.items()))


def full_dir(run: str) -> Path:
    """The model trained on every training image (full_fit), beside the folds."""
    return run_dir(run) / "full"


def submissions_dir() -> Path:
    return root() / "submissions"


def submission_path(run: str) -> Path:
    """A run's submission CSV; its provenance is the .json beside it."""
    return submissions_dir() / f"{run}.csv"
