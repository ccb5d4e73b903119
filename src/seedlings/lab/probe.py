"""The bar a fine-tune must clear: logistic regression on the frozen backbone's pooled features (a linear probe).

The same solver (features.fit_logistic) fits the recipe's head in a `fit: logistic` stage, so the fine-tune starts
where the probe ends. `make compare`'s probe rows: the baseline probe and the recipe's own backbone's.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from seedlings.data.cache import load_cache
from seedlings.lab.holdout import answers_of, graded_row
from seedlings.metrics import micro_f1
from seedlings.recipe.schema import CACHE_MARGIN, Recipe
from seedlings.run import Run
from seedlings.train.features import fit_logistic, pooled_features
from seedlings.train.fold import FoldContext, prepare_fold
from seedlings.train.model import BUNDLED


@torch.no_grad()
def mirror_features(ctx: FoldContext, size: int, index: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
    """Pooled features averaged over the image and its mirror image (the probe's strongest cheap form)."""
    feats = pooled_features(ctx, size, index, views=(0, 4), images=images)
    return feats.mean(1).numpy()


def linear_probe(run: Run, fold: int, size: int) -> dict:
    """Micro-F1 on the fold's validation images of the probe on mirror-averaged pooled features at `size` px."""
    start = time.perf_counter()
    ctx = prepare_fold(probe_run(run, size), fold)
    feats = mirror_features(ctx, size, np.arange(len(ctx.labels)))
    head = fit_logistic(feats[ctx.train_idx], ctx.labels[ctx.train_idx], len(ctx.classes), seed=run.recipe.seed)
    pred = head.logits(feats[ctx.val_idx]).argmax(1)
    return {
        "size": size,
        "c": head.c,
        "val_f1": micro_f1(ctx.labels[ctx.val_idx], pred),
        "seconds": time.perf_counter() - start,
    }


def probe_run(run: Run, size: int) -> Run:
    """The run's data and folds with a recipe whose cache is large enough for `size` px features (like any training
    size); it trains nothing and writes nothing under runs/."""
    recipe = run.recipe
    margin = max(recipe.cache_margin, size * CACHE_MARGIN / recipe.max_size)
    return dataclasses.replace(run, name=f"{run.name}-probe", recipe=dataclasses.replace(recipe, cache_margin=margin))


# the bar every recipe is held to, whatever its backbone: the linear probe on Lite0's ImageNet features of the
# unmasked photos, as in every compare table since the first (a recipe's own backbone gets a probe row of its own)
PROBE_MODEL = "tf_efficientnet_lite0"


def probe_recipe(recipe: Recipe, model: str) -> Recipe:
    """The baseline probe's recipe: `model` on the unmasked photos (bundled weights when the package has them)."""
    pretrained = "bundled" if model in BUNDLED else recipe.pretrained
    return dataclasses.replace(recipe, model=model, plant_mask="none", pretrained=pretrained)


def probe_rows(held: Run, sizes: tuple[int, ...], model: str) -> list[dict]:
    """The baseline probe at each size, and, when the recipe's backbone or input differs from it, the probe on the
    recipe's own features at the largest size (what the fine-tune adds over its own frozen backbone)."""
    baseline = dataclasses.replace(held, recipe=probe_recipe(held.recipe, model))
    rows = [probe_row(baseline, s) for s in dict.fromkeys(sizes)]
    if baseline.recipe != held.recipe:
        rows.append(probe_row(held, max(sizes)))
    return rows


def probe_row(run: Run, size: int) -> dict:
    """The linear probe trained on every labelled image of the split (mirror-averaged features, C by CV)."""
    start = time.perf_counter()
    probe = probe_run(run, size)
    ctx = prepare_fold(probe, 0)  # every image is used: fold 0's split only orders them
    every = np.sort(np.concatenate([ctx.train_idx, ctx.val_idx]))
    x = mirror_features(ctx, size, every)
    fit = fit_logistic(x, ctx.labels[every], len(ctx.classes), seed=run.recipe.seed)
    test = load_cache(ctx.comp, "test", probe.recipe.cache_size, mask=probe.recipe.plant_mask)
    pred = fit.logits(mirror_features(ctx, size, np.arange(len(test.files)), test.images)).argmax(1)
    y = answers_of(run.data, test.files, ctx.comp.classes)
    masked = f" with plant_mask={run.recipe.plant_mask}" if run.recipe.plant_mask != "none" else ""
    return graded_row(
        f"linear probe, {run.recipe.model} features{masked} at {size} px", y, pred, time.perf_counter() - start,
        f"logistic regression, C={fit.c:g} by {3}-fold CV, image + mirror features",
    )  # fmt: skip
