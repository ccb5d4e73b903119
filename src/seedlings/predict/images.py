"""`seedlings predict-images`: a finished run's chain on photos it never saw (files, folders, globs), as `make submit`
predicted its test images: every member with the recipe's TTA and plant mask, blended with the weights and the
calibration the submission recorded (submissions/<run>.json)."""

from __future__ import annotations

import glob
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from seedlings.data.cache import _load
from seedlings.data.competition import _listed, parallel_imap
from seedlings.errors import UserError
from seedlings.predict.blend import NOT_PARTS, Calibration, full_fit_weights
from seedlings.predict.infer import tta_probs
from seedlings.predict.members import Member, run_members
from seedlings.predict.submission import species_of
from seedlings.recipe.load import with_changes
from seedlings.recipe.schema import VARIANT_KEYS
from seedlings.run import Run, saved_run
from seedlings.storage import Probs, finite_number, read_json
from seedlings.train.fold import prepare_fold
from seedlings.train.predictor import Predictor


def photo_paths(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """The files named by `inputs` in order (a folder: the files inside it, sorted; a pattern: its matches, sorted),
    each once, and one line for each input that named none."""
    found, missing = [], []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if _listed(p))
            why = "a folder with no files"
        elif path.is_file() or not any(c in given for c in "*?["):  # an existing file first, even plant[1].jpg
            files = [path] if path.is_file() else []
            why = "no such file"
        else:
            files = sorted(Path(p) for p in glob.glob(given, recursive=True) if _listed(Path(p)))
            why = "no file matches this pattern"
        found += files
        if not files:
            missing.append(f"{given}: {why}")
    by_file: dict[Path, Path] = {}  # one row a file, however often and by whichever path it was named (the first)
    for f in found:
        by_file.setdefault(f.resolve(), f)
    return list(by_file.values()), missing


def read_photos(files: list[Path], size: int, mask: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """The readable files as the run's cache holds images ((N, size, size, 3) uint8, plant mask applied), and one
    line naming each file that could not be read."""
    good, images, bad = [], [], []
    decoded = parallel_imap(partial(_load, size=size, mask=mask), files, desc="read photos")  # as the cache decodes
    for path, (img, err) in zip(files, decoded, strict=True):
        if err is None:
            good.append(path)
            images.append(img)
        else:
            bad.append(err)
    return good, np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), bad


def chain_record(run: Run) -> dict:
    """What the chain blended and how: the submission's provenance (weights per part, calibration, runs)."""
    path = run.submission_path.with_suffix(".json")
    fix = f"make submit RUN={run.name} writes it"
    record = read_json(path, "provenance of the run's submission", fix, ("members", "calibration", "runs"))
    why = damage(record, run)
    if why:
        raise UserError(f"{path}: damaged provenance of the run's submission ({why}); {fix}")
    if record.get("recipe", {}).get("specialist"):
        raise UserError(f"{path}: run {run.name!r} blends a specialist; predict-images predicts chains without one")
    return record


def damage(record: dict, run: Run) -> str:
    """What is wrong with the shape of a submission's provenance where predict-images and export read it ("": none):
    they must blend exactly what the submission blended, or refuse."""

    def number(x) -> bool:
        return finite_number(x) is not None

    members, runs, calibration = record["members"], record["runs"], record["calibration"]
    rows = [row for name, row in members.items() if name not in NOT_PARTS] if isinstance(members, dict) else []
    if not rows or not all(isinstance(r, dict) and number(r.get("weight")) and r["weight"] >= 0 for r in rows):
        return "members: not a table of parts with their weights"
    if not any(r["weight"] > 0 for r in rows):
        return "members: no part with a weight above 0"
    if not isinstance(runs, list) or not runs or runs[0] != run.name or not all(isinstance(r, str) for r in runs):
        return f"runs: not a list of run names starting with {run.name!r}"
    missing = record.get("missing_folds", [])
    if not isinstance(missing, list) or not all(isinstance(f, int) and not isinstance(f, bool) for f in missing):
        return "missing_folds: not a list of fold numbers"
    if calibration is not None and not isinstance(calibration, dict):
        return "calibration: neither null nor a mapping"
    if calibration and calibration.get("used"):
        bias = calibration.get("bias")
        if not number(calibration.get("temperature")) or not isinstance(bias, dict):
            return "calibration: used, without its temperature or biases"
        if not all(number(bias.get(c)) for c in run.comp.classes):
            return "calibration: a species without its bias"
    return ""


def blended_folds(run: Run, record: dict) -> list[int]:
    """The run's folds its submission blended: a fold trained after it (missing_folds) is left out, as it was."""
    return [fold for fold in run.models() if fold not in record.get("missing_folds", [])]


def submitted_run(name: str) -> tuple[Run, dict]:
    """A run opened as its submission predicted it (the prediction and blend keys its provenance recorded: a variant's
    where the submission was a variant's), and that provenance."""
    run = saved_run(name)
    record = chain_record(run)
    recipe = record.get("recipe")
    variant = {k: v for k, v in recipe.items() if k in VARIANT_KEYS} if isinstance(recipe, dict) else {}
    return replace(run, recipe=with_changes(run.recipe, variant)), record  # free keys: the run's checks still hold


def member_probs(run: Run, images: np.ndarray, folds: list[int] | None = None) -> dict[Member, np.ndarray]:
    """Every trained member's (of `folds`: every fold) TTA probabilities of `images` (maps of their views computed
    here, never stored)."""
    out = {}
    for fold in run.models() if folds is None else folds:
        members = run_members(run, fold) if run.is_trained(fold) else []
        if not members:
            continue
        ctx = prepare_fold(run, fold, training_images=False)  # the photos given, never the training images
        predictor = Predictor(ctx, images)
        for m in members:
            ctx.model.load_state_dict(m.state_dict(ctx.device))
            out[m] = tta_probs(predictor, "test", np.arange(len(images)), run.recipe.tta)
    if not out:
        raise UserError(f"run {run.name!r}: no trained fold (make train RUN={run.name})")
    return out


def member_weights(record: dict, members: list[Member]) -> dict[Member, float]:
    """Each member's share of the chain's blend before calibration: a part (run/snapshot) weighted as the submission
    recorded, shared equally by its folds; with a full fit, k fold models and it weighted k : 1, its snapshots as the
    blend weighted the folds' same snapshots (blend.blend_full)."""
    table = record["members"]
    parts = {name: row["weight"] for name, row in table.items() if name not in NOT_PARTS}
    folds = [m for m in members if not m.full]
    share = {m: 0.0 for m in members}
    for name, weight in parts.items():
        mine = [m for m in folds if f"{m.run}/{m.name}" == name]
        if not mine:
            raise UserError(f"{name}: blended by the submission but not trained now; make submit again")
        for m in mine:
            share[m] = weight / len(mine)
    full = [m for m in members if m.full]
    if full:
        k = len({(m.run, m.fold) for m in folds})
        share = {m: w * k / (k + 1) for m, w in share.items()}
        share.update({m: float(w) / (k + 1) for m, w in zip(full, full_fit_weights(full, table), strict=True)})
    return share


def recorded_calibration(record: dict, classes: list[str]) -> Calibration | None:
    """The calibration the chain applied to its blend (None when it left it out or had none)."""
    calibration = record["calibration"]
    if not calibration or not calibration.get("used"):
        return None
    return Calibration(calibration["temperature"], np.array([calibration["bias"][c] for c in classes]))


def predict_images(name: str, inputs: list[str], out: str | None = None) -> pd.DataFrame:
    """file, species and the probability of every class for each readable photo; an input naming no file or a file
    that cannot be read is named on stderr and skipped; none readable exits 2. out: where the table will be written,
    refused (before anything is predicted) when it is one of the photos."""
    files, missing = photo_paths(inputs)
    if out is not None and Path(out).resolve() in {f.resolve() for f in files}:
        raise UserError(f"--out {out}: is one of the photos to classify; name a new .csv file")
    run, record = submitted_run(name)
    variant = run.variant_keys()
    runs = [run, *(saved_run(other, variant=variant) for other in record["runs"] if other != run.name)]
    files, images, bad = read_photos(files, run.recipe.cache_size, run.recipe.plant_mask)
    for line in missing + bad:
        print(f"skipped: {line}", file=sys.stderr)
    if not files:
        raise UserError(f"{' '.join(inputs)}: no readable image to predict")
    probs = {}
    for r in runs:  # the run's own folds as the submission blended them; the others' as they are
        probs.update(member_probs(r, images, blended_folds(r, record) if r is run else None))
    classes = run.comp.classes
    share = member_weights(record, list(probs))
    test = sum(share[m] * p for m, p in probs.items())
    calibration = recorded_calibration(record, classes)
    test = calibration.apply(test) if calibration is not None else test
    blended = Probs(test, [str(f) for f in files], classes)
    table = pd.DataFrame(blended.values, columns=classes)
    table.insert(0, "species", species_of(blended.values, classes))
    table.insert(0, "file", blended.files)
    return table
