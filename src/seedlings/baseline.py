"""The bar a fine-tune must clear: logistic regression on the frozen backbone's pooled features (a linear probe).

The same solver (features.fit_logistic) fits the recipe's head in a `fit: logistic` stage, so the fine-tune starts
where the probe ends.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from seedlings.config import CACHE_MARGIN
from seedlings.context import FoldContext, prepare_fold
from seedlings.features import fit_logistic, pooled_features
from seedlings.metrics import micro_f1
from seedlings.run import Run


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
    head = fit_logistic(feats[ctx.train_idx], ctx.labels[ctx.train_idx], len(ctx.comp.classes), seed=run.recipe.seed)
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
