"""The Kaggle notebook `make kaggle` writes: it installs what the image lacks from the bundle's wheels (no index, no
dependency resolution, never replacing the image's own packages), runs the chain on the mounted competition (two GPUs:
two folds at once, one per GPU), writes /kaggle/working/submission.csv and shows the run's report.

The cells are plain Python kept here as text; $KAGGLE_ROOT (default /kaggle) lets a test lay the competition out as
Kaggle mounts it and run the same notebook."""

from __future__ import annotations

import json
from pathlib import Path

FIND_AND_INSTALL = """\
import importlib, importlib.metadata, json, os, subprocess, sys
from pathlib import Path

ROOT = Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))  # where Kaggle mounts inputs and keeps outputs
INPUT, WORK = ROOT / "input", ROOT / "working"
BUNDLE = next(p.parent for p in sorted(INPUT.rglob("seedlings-bundle.json")))  # the wheel dataset, wherever mounted
DATA = next(p.parent for p in sorted(INPUT.rglob("sample_submission.csv")) if (p.parent / "train").is_dir())
bundle = json.loads((BUNDLE / "seedlings-bundle.json").read_text())


def installed(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# only what the image lacks: its torch, torchvision, numpy and the rest stay as they are
missing = [w for w in bundle["wheels"] if installed(w["name"]) is None]
if missing:
    wheels = [str(BUNDLE / w["file"]) for w in missing]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels], check=True)
    importlib.invalidate_caches()
print(f"bundle {bundle['git_commit'][:10]} from {BUNDLE}; installed {len(missing)} of {len(bundle['wheels'])} "
      f"wheels: {', '.join(w['name'] for w in missing) or 'none'}; competition {DATA}")
"""

RUN_CHAIN = """\
RECIPE = WORK / "recipe.yaml"
RECIPE.write_text(RECIPE_TEXT)
if bundle["weights"]:  # a hub model's ImageNet weights: their own dataset, sent once by make kaggle-push
    found = sorted(INPUT.rglob(bundle["weights"]["file"]))
    assert found, f"{bundle['weights']['file']}: not among the inputs; make kaggle-push sends its dataset"
    OVERRIDES = [*OVERRIDES, f"pretrained={found[0]}"]
import torch

gpus = torch.cuda.device_count()
env = {**os.environ, "SEEDLINGS_HOME": str(WORK)}  # runs/, data/ (folds, caches) and submissions/ under working/
seedlings = [sys.executable, "-m", "seedlings.cli"]
split = ["--data", str(DATA), "--n-folds", str(N_FOLDS), "--fold-seed", str(FOLD_SEED)]
common = [*split, "--config", str(RECIPE), "--run", RUN, *OVERRIDES]
print(f"{gpus} GPU(s): {[torch.cuda.get_device_name(i) for i in range(gpus)]}", flush=True)
subprocess.run([*seedlings, "folds", *split], env=env, check=True)  # once, before processes share it
if gpus > 1:  # one process per GPU; each trains the folds no other process holds, so two folds train at once
    workers = [subprocess.Popen([*seedlings, "train", *common],
                                env={**env, "CUDA_VISIBLE_DEVICES": str(i), "SEEDLINGS_JOBS": str(gpus)})
               for i in range(gpus)]
    codes = [w.wait() for w in workers]
    assert all(code in (0, 3) for code in codes), f"a fold process failed: exit codes {codes}"  # 3: held elsewhere
subprocess.run([*seedlings, "submit", *common], env=env, check=True)
"""

SHOW = """\
import re
import shutil

import pandas as pd
from IPython.display import Image, Markdown, display

os.environ["SEEDLINGS_HOME"] = str(WORK)  # where the chain wrote; seedlings.paths names its files
from seedlings import paths

shutil.copy(paths.submission_path(RUN), WORK / "submission.csv")
shutil.rmtree(paths.cache_dir(), ignore_errors=True)  # decoded images: made again on demand, not an output
report = paths.run_dir(RUN) / paths.REPORT / paths.REPORT_MD
text = report.read_text() if report.exists() else f"{report}: no report"
for part in re.split(r"(!\\[[^]]*\\]\\([^)]+\\))", text):  # the report's text, its pictures embedded in the notebook
    picture = re.fullmatch(r"!\\[[^]]*\\]\\(([^)]+)\\)", part)
    if picture is None:
        display(Markdown(part))
    elif (report.parent / picture[1]).is_file():  # the folds' curves, confusion, worst photos
        display(Image(filename=str(report.parent / picture[1])))
print(pd.read_csv(WORK / "submission.csv").species.value_counts().to_string())
"""


def cell(kind: str, text: str) -> dict:
    lines = text.splitlines(keepends=True)
    if kind == "markdown":
        return {"cell_type": "markdown", "metadata": {}, "source": lines}
    return {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": lines}


def write_notebook(path: Path, run: str, recipe_text: str, overrides: list[str], n_folds: int, fold_seed: int,
                   weights: dict | None) -> Path:  # fmt: skip
    """The notebook for one run: its recipe, overrides and split written into its first code cell."""
    settings = (f"RUN = {run!r}\nN_FOLDS, FOLD_SEED = {n_folds}, {fold_seed}\nOVERRIDES = {list(overrides)!r}\n"
                f"RECIPE_TEXT = {recipe_text!r}\n")  # fmt: skip
    intro = (
        f"# seedlings: run `{run}` on Kaggle\n\nWritten by `make kaggle`. It installs what this image lacks "
        "from the attached wheel dataset (no internet), trains and predicts the recipe below on the mounted "
        "competition (with two GPUs, two folds at once), writes `/kaggle/working/submission.csv` and shows the "
        "run's report. `make kaggle-output` brings `runs/` and the submission back to your checkout."
        + (f"\n\nThe ImageNet weights of `{weights['model']}` come from their own dataset." if weights else "")
    )
    cells = [cell("markdown", intro), cell("code", settings), cell("code", FIND_AND_INSTALL),
             cell("code", RUN_CHAIN), cell("code", SHOW)]  # fmt: skip
    kernel = {"display_name": "Python 3", "language": "python", "name": "python3"}
    notebook = {"cells": cells, "metadata": {"kernelspec": kernel, "language_info": {"name": "python"}},
                "nbformat": 4, "nbformat_minor": 4}  # fmt: skip
    path.write_text(json.dumps(notebook, indent=1))
    return path
