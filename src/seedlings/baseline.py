"""The bar a fine-tune must clear: logistic regression on the frozen backbone's pooled features (a linear probe).

The same solver fits the recipe's head in a `fit: logistic` stage, so the fine-tune starts where the probe ends.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.preprocessing import StandardScaler

from seedlings.config import CACHE_MARGIN
from seedlings.context import FoldContext, prepare_fold
from seedlings.metrics import micro_f1
from seedlings.run import Run
from seedlings.train import pooled_features

C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)  # inverse L2 strengths tried on standardised features (Lite0: 1280)
CV_FOLDS = 3


@dataclasses.dataclass
class Logistic:
    """A fitted probe as one linear layer on raw features: logits = x @ weight.T + bias."""

    weight: np.ndarray  # (n_classes, n_features)
    bias: np.ndarray  # (n_classes,)
    c: float  # the inverse L2 strength chosen

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


def choose_c(x: np.ndarray, y: np.ndarray, seed: int = 0, scoring: str = "accuracy") -> float:
    """The C of C_GRID with the best cross-validated score (ties: the smaller C, the stronger prior).

    scoring: accuracy for the probe (the metric); neg_log_loss for a head that fine-tuning starts from: calibrated
    rather than confident, so the first unfrozen epochs are not spent undoing its confidence (README: transition).
    """
    n_splits = min(CV_FOLDS, int(np.bincount(y).min()) if len(y) else 0)
    if n_splits < 2:
        return 0.03  # a class with one image: no cross-validation possible; a middle value
    cv = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    scores = [cross_val_score(_model(c), x, y, cv=cv, scoring=scoring).mean() for c in C_GRID]
    return C_GRID[int(np.argmax(scores))]


def _model(c: float) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=1000, tol=1e-3)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, n_classes: int, c: float | None = None, seed: int = 0, scoring: str = "accuracy"
) -> Logistic:
    """Multinomial logistic regression on standardised features, folded back into one linear layer on raw features.

    c None: chosen by cross-validation on (x, y). Classes absent from y get a zero row and a bias of -20 (never
    predicted), so the layer always has n_classes outputs.
    """
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    present, y_idx = np.unique(y, return_inverse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol 1e-3 is met long before accuracy changes
        c = choose_c(z, y_idx, seed, scoring) if c is None else c
        clf = _model(c).fit(z, y_idx)
    w = clf.coef_ / scaler.scale_  # undo the standardisation: w.(x - mu)/s + b = (w/s).x + (b - (w/s).mu)
    b = clf.intercept_ - w @ scaler.mean_
    if len(present) == 2:  # sklearn stores one row for two classes: the logit of the second
        w, b = np.stack([-w[0] / 2, w[0] / 2]), np.array([-b[0] / 2, b[0] / 2])
    weight = np.zeros((n_classes, x.shape[1]))
    bias = np.full(n_classes, -20.0)
    weight[present], bias[present] = w, b
    return Logistic(weight.astype(np.float32), bias.astype(np.float32), float(c))


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
