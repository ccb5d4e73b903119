"""Pooled features of the frozen backbone (fast.ai's precompute) and the head solved on them by logistic regression:
the recipe's first stage and the linear-probe baseline share this solver, so the fine-tune starts where the probe ends.
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
from torch import nn
from tqdm import tqdm

from seedlings.context import FoldContext, eval_loader
from seedlings.errors import UserError
from seedlings.files import load_torch, save_torch
from seedlings.metrics import log_loss, val_scores
from seedlings.step import autocast, to_device
from seedlings.tta import dihedral

VAL_KEYS = ("val_loss", "val_f1", "val_macro_f1")
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)  # inverse L2 strengths tried on standardised features (Lite0: 1280)
CV_FOLDS = 3


@torch.no_grad()
def pooled_features(
    ctx: FoldContext, size: int, index: np.ndarray, views: tuple[int, ...] = (0,), images: np.ndarray | None = None
) -> torch.Tensor:
    """Frozen backbone's pooled features, (N, len(views), F): fast.ai's precompute; views are dihedral members."""
    ctx.model.eval()
    out = []
    for x, _ in tqdm(eval_loader(ctx, size, index, images), desc=f"features {size}px", leave=False, disable=None):
        x, model, feats = to_device(x, ctx.device), ctx.model, []
        for k in views:
            with autocast(ctx.device, ctx.inference_bf16):
                feats.append(model.forward_head(model.forward_features(dihedral(x, k)), pre_logits=True).float())
        out.append(torch.stack(feats, 1).cpu())
    return torch.cat(out)


def features_for(ctx: FoldContext, stage_i: int) -> torch.Tensor:
    """Features of every training image; shared by all folds of a run while the backbone is still the pretrained one."""
    recipe = ctx.recipe
    stage = recipe.stages[stage_i]
    shared = all(s.freeze and s.precompute for s in recipe.stages[:stage_i])
    where = ctx.run.dir / "features" if shared else ctx.dir / "features"
    path = where / f"s{stage_i}-{stage.size}px-{'d4' if recipe.precompute_d4 else 'id'}-{len(ctx.labels)}.pt"
    if path.exists():
        return load_torch(path, "precomputed features")
    views = tuple(range(8)) if recipe.precompute_d4 else (0,)
    feats = pooled_features(ctx, stage.size, np.arange(len(ctx.labels)), views)
    save_torch(path, feats)
    return feats


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
def fit_head(ctx: FoldContext, stage_i: int, epoch: int) -> dict:
    """A `fit: logistic` stage: the classifier solved on the precomputed features (the linear probe, converged, its L2
    strength chosen by cross-validated log loss on the fold's training images); one row of metrics.csv."""
    start = time.perf_counter()
    stage, head = ctx.recipe.stages[stage_i], ctx.model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise UserError(f"stages.{stage_i}.fit: logistic needs a linear classifier, {ctx.recipe.model} has {head}")
    feats = features_for(ctx, stage_i)
    x_train, y_train = feats[ctx.train_idx].mean(1).numpy(), ctx.labels[ctx.train_idx]  # views averaged
    c = ctx.recipe.head_c or None
    fit = fit_logistic(x_train, y_train, len(ctx.comp.classes), c, ctx.recipe.seed, scoring="neg_log_loss")
    head.weight.copy_(torch.from_numpy(fit.weight))
    head.bias.copy_(torch.from_numpy(fit.bias))
    train_probs = torch.from_numpy(fit.logits(x_train)).softmax(-1).numpy()
    val_probs = torch.from_numpy(fit.logits(feats[ctx.val_idx, 0].numpy())).softmax(-1).numpy()
    nan = float("nan")  # the full fit has no validation images
    val = val_scores(val_probs, ctx.labels[ctx.val_idx]) if len(ctx.val_idx) else dict.fromkeys(VAL_KEYS, nan)
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch + 1,
        "stage": stage_i,
        "size": stage.size,
        "train_loss": log_loss(train_probs, y_train),
        **val,
        "lr": 0.0,
        "seconds": seconds,
        "images_per_s": len(y_train) / seconds,
        "head_c": fit.c,
    }
