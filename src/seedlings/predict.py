"""Out-of-fold and test probabilities with TTA, for every member (fold x last-stage snapshot) of a run."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from tqdm import tqdm

from seedlings.cache import load_cache
from seedlings.context import FoldContext, autocast, eval_loader, prepare_fold, to_device
from seedlings.files import write_json
from seedlings.run import Member, Probs, Run
from seedlings.tta import tta_predict, tta_views


@torch.no_grad()
def tta_probs(ctx: FoldContext, images: np.ndarray | None, index: np.ndarray, size: int, tta: str) -> np.ndarray:
    """Probabilities of `index` rows of the training cache (or of `images`) averaged over the `tta` views."""
    model = ctx.model.eval()
    out = []
    for x, _ in tqdm(eval_loader(ctx, size, index, images), desc=f"predict {tta}", leave=False, disable=None):
        with autocast(ctx):
            out.append(tta_predict(model, to_device(ctx, x), tta, ctx.recipe.tta_mean).float().cpu())
    return torch.cat(out).numpy()


def prediction_inputs(member: Member, run: Run) -> dict:
    """What a member's probabilities depend on besides the data: its weights and the prediction keys."""
    recipe = run.recipe
    return {
        "weights_mtime_ns": member.weights.stat().st_mtime_ns,
        "tta": recipe.tta,
        "tta_mean": recipe.tta_mean,
        "size": recipe.eval_size,
    }


def is_predicted(member: Member, run: Run) -> bool:
    meta = member.meta_path
    return meta.exists() and json.loads(meta.read_text()).get("inputs") == prediction_inputs(member, run)


def predict_fold(run: Run, fold: int) -> list[Member]:
    """Probabilities of each member of one fold; members already predicted from the same inputs are skipped."""
    members = run.members(fold)
    todo = [m for m in members if not is_predicted(m, run)]
    if not todo:
        return members
    recipe, size = run.recipe, run.recipe.eval_size
    ctx = prepare_fold(run, fold)
    test = load_cache(ctx.comp, "test", recipe.cache_size, recipe.skip_bad_images)
    classes, val_files = ctx.comp.classes, [ctx.comp.train_files[i] for i in ctx.val_idx]
    for m in todo:
        ctx.model.load_state_dict(m.state_dict(ctx.device))
        start = time.perf_counter()
        oof = tta_probs(ctx, None, ctx.val_idx, size, recipe.tta)
        test_probs = tta_probs(ctx, test.images, np.arange(len(test.files)), size, recipe.tta)
        seconds = time.perf_counter() - start
        m.save("oof", Probs(oof, val_files, classes))
        m.save("test", Probs(test_probs, test.files, classes))
        if m == members[-1] and recipe.tta != "none":  # the single model without TTA, for comparison
            m.save("oof-notta", Probs(tta_probs(ctx, None, ctx.val_idx, size, "none"), val_files, classes))
        n_images, n_views = len(oof) + len(test_probs), len(tta_views(recipe.tta))
        info = {"seconds": seconds, "images": n_images, "images_per_s": n_images / seconds, "views": n_views}
        write_json(m.meta_path, {"inputs": prediction_inputs(m, run), **info})
        print(
            f"fold {fold} {m.name}: {n_images} images x {n_views} views in {seconds:.1f}s "
            f"({info['images_per_s']:.1f} images/s)"
        )
    return members


def predict_run(run: Run, folds: list[int] | None = None) -> list[Member]:
    """Every member of the run's folds (or of `folds`)."""
    return [m for fold in (run.folds() if folds is None else folds) for m in predict_fold(run, fold)]
