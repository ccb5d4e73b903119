"""Every path the pipeline writes derives from here: the repo root (or $SEEDLINGS_HOME) and the run name; a run's
files and folders are named here once (README, where things go), and every module reaches them through these names
(tests/test_layout.py fails when another module spells one)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# runs/<run>/
CONFIG = "config.yaml"  # the resolved recipe, split and data
DATA_RECORD = "data.json"  # every image's size, time and sha256; the folds' and the config's sha256
MLFLOW_IDS = "mlflow.json"  # the run's MLflow run ids, so a resumed fold logs on into its own
PROBS = "probs"  # the members' and the blend's probabilities (a variant's in probs/<variant>/)
FEATURES = "features"  # precomputed features and maps (in the run's folder when its folds share them)
BLEND = "blend"  # the blend's probabilities in probs/: blend.oof.csv, blend.test.csv
REPORT, REPORT_MD = "report", "report.md"  # the chain's report and its pictures
EXPORT = "export"  # seedlings export: MODEL and MODEL_CARD
MODEL, MODEL_CARD = "model.onnx", "model.json"
# runs/<run>/fold<k>/ (and a full fit's full/)
CHECKPOINT = "checkpoint.pt"  # the fold's state after its last finished epoch: a resume starts from it
FINAL = "final.pt"  # the fold's final weights
SNAPSHOTS = "snapshots"  # each SGDR cycle's weights, <stage>-<cycle>.pt
WEIGHTS = "weights.json"  # the sha256 of each weights file, checked before it is read
METRICS, LRS = "metrics.csv", "lrs.csv"  # a row per epoch; the learning rate of each step
LOSS_PLOT, LR_PLOT = "loss.png", "lr.png"
DONE = "done.json"  # the fold's final figures: it is trained
LOCK = ".lock"  # held while a process trains or predicts the fold
TEACHER = "teacher.csv"  # the teachers' probabilities of the fold's training images
FOLD_RECORDS = (METRICS, LRS, LOSS_PLOT, LR_PLOT, DONE)  # what a fold's tracking keeps of it


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
    return run_dir(run) / PROBS / variant if variant else run_dir(run) / PROBS


def probs_file(folder: Path, label: str, split: str) -> Path:
    """A member's (or the blend's) probabilities of one split in a probs folder: `fold0-final.oof.csv`."""
    return folder / f"{label}.{split}.csv"


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
