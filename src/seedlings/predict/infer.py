"""Out-of-fold and test probabilities with TTA, for every member (fold x last-stage snapshot) of a run."""

from __future__ import annotations

import json
import time

import numpy as np

from seedlings import paths
from seedlings.data.cache import load_cache
from seedlings.errors import UserError
from seedlings.predict.members import Member, run_members
from seedlings.predict.tta import mean_of_views, tta_views
from seedlings.recipe.schema import PREDICTION_KEYS
from seedlings.run import Run
from seedlings.storage import Probs, exclusive, file_sha256, write_json
from seedlings.train.fold import prepare_fold
from seedlings.train.predictor import Predictor


def tta_probs(predictor: Predictor, split: str, rows: np.ndarray, tta: str) -> np.ndarray:
    """Probabilities of `rows` of the fold's training (split "train") or test images averaged over the `tta` views."""
    views = predictor.probs(split, rows, tta_views(tta))
    return mean_of_views(views, predictor.ctx.recipe.tta_mean).numpy()


def prediction_inputs(member: Member, run: Run, test_key: str) -> dict:
    """What a member's probabilities depend on: its weights, the recipe's prediction keys, the size predicted at and
    the test images' contents (the training images cannot change under a run: opening it checks them)."""
    recipe = run.recipe
    if not member.weights.exists():
        raise UserError(f"{member.weights}: weights of fold {member.fold} of run {run.name!r} missing; "
                        f"{member.retrain}")  # fmt: skip
    keys = {k: getattr(recipe, k) for k in PREDICTION_KEYS if k != "predict_size"}  # the size: eval_size below
    return {"weights_mtime_ns": member.weights.stat().st_mtime_ns, **keys, "size": recipe.eval_size,
            "test_images": test_key}  # fmt: skip


def is_predicted(member: Member, inputs: dict) -> bool:
    """Predicted from these inputs, and every probability file still what was written (a file cut short, emptied or
    edited is predicted again, never blended)."""
    try:
        meta = json.loads(member.meta_path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False  # none yet, or damaged: predict again
    if not isinstance(meta, dict) or meta.get("inputs") != inputs or not isinstance(meta.get("sha256"), dict):
        return False
    return all(member.probs_path(split).exists() and file_sha256(member.probs_path(split)) == digest
               for split, digest in meta["sha256"].items())  # fmt: skip


def predict_fold(run: Run, fold: int, test_key: str | None = None) -> list[Member]:
    """Probabilities of each member of one fold; members already predicted from the same inputs are skipped.
    test_key: run.test_key(), when the caller has it already."""
    members = run_members(run, fold)
    test_key = test_key or run.test_key()
    todo = [m for m in members if not is_predicted(m, prediction_inputs(m, run, test_key))]
    if not todo:
        return members
    with exclusive(run.fold_dir(fold) / paths.LOCK, f"fold {fold} of run {run.name!r}"):
        predict_members(run, fold, todo, test_key)
    return members


def predict_members(run: Run, fold: int, todo: list[Member], test_key: str) -> None:
    last = run_members(run, fold)[-1]
    recipe = run.recipe
    ctx = prepare_fold(run, fold)
    test = load_cache(ctx.comp, "test", recipe.cache_size, recipe.skip_bad_images, recipe.plant_mask)
    classes, val_files = ctx.classes, [ctx.comp.train_files[i] for i in ctx.predict_idx]
    has_val = len(ctx.predict_idx) > 0  # the full fit has no validation images: test probabilities only
    predictor = Predictor(ctx, test.images, test_key)
    for m in todo:
        ctx.model.load_state_dict(m.state_dict(ctx.device))
        start = time.perf_counter()
        oof = tta_probs(predictor, "train", ctx.predict_idx, recipe.tta) if has_val else np.zeros((0, len(classes)))
        test_probs = tta_probs(predictor, "test", np.arange(len(test.files)), recipe.tta)
        seconds = time.perf_counter() - start
        splits = ["oof", "test"] if has_val else ["test"]
        if has_val:
            m.save("oof", Probs(oof, val_files, classes))
        m.save("test", Probs(test_probs, test.files, classes))
        if has_val and m == last and recipe.tta != "none":  # the single model without TTA, for comparison
            m.save("oof-notta", Probs(tta_probs(predictor, "train", ctx.predict_idx, "none"), val_files, classes))
            splits.append("oof-notta")
        n_images, n_views = len(oof) + len(test_probs), len(tta_views(recipe.tta))
        info = {"seconds": seconds, "images": n_images, "images_per_s": n_images / seconds, "views": n_views}
        info["sha256"] = {split: file_sha256(m.probs_path(split)) for split in splits}
        write_json(m.meta_path, {"inputs": prediction_inputs(m, run, test_key), **info})
        print(
            f"fold {fold} {m.name}: {n_images} images x {n_views} views in {seconds:.1f}s "
            f"({info['images_per_s']:.1f} images/s)"
        )


def predict_run(run: Run, folds: list[int] | None = None) -> list[Member]:
    """Every member of the run's folds (or of `folds`)."""
    test_key = run.test_key()  # the test images are listed and checked once, not once per fold
    return [m for fold in (run.models() if folds is None else folds) for m in predict_fold(run, fold, test_key)]
