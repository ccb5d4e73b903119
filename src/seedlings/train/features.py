"""What frozen layers compute, computed once (fast.ai's precompute): the backbone's pooled features, and the head solved
on them by logistic regression (the recipe's first stage and the linear-probe baseline share this solver, so the
fine-tune starts where the probe ends); and the maps of a stage's frozen layer groups for the 8 dihedral views of each
image, which the layers after them train on (`precompute` with `frozen_groups`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.preprocessing import StandardScaler
from torch import nn

from seedlings import paths
from seedlings.data.augment import DIHEDRAL, dihedral
from seedlings.errors import UserError
from seedlings.metrics import NO_VALIDATION, log_loss, val_scores
from seedlings.progress import bar
from seedlings.recipe.schema import HEAD_ON_FEATURES, SOLVED_HEAD
from seedlings.storage import load_torch, save_torch
from seedlings.train.engine import fixed_forward
from seedlings.train.fold import FoldContext, eval_loader
from seedlings.train.model import body_sequence, frozen_prefix
from seedlings.train.step import autocast, to_device

C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)  # inverse L2 strengths tried on standardised features (Lite0: 1280)
CV_FOLDS = 3


def pooled_features(
    ctx: FoldContext, size: int, index: np.ndarray, views: tuple[int, ...] = (0,), images: np.ndarray | None = None
) -> torch.Tensor:
    """Frozen backbone's pooled features, (N, len(views), F): fast.ai's precompute; views are dihedral members."""
    pooled = fixed_forward(ctx.engine, Pooled(ctx.model), len(index) * len(views), size)
    return per_view(ctx, lambda x: pooled(x).float(), size, index, views, images, f"features {size}px")


class Pooled(nn.Module):
    """The backbone's pooled features (before the classifier) of a timm model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@torch.no_grad()
def per_view(
    ctx: FoldContext,
    through: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    index: np.ndarray,
    views: tuple[int, ...],
    images: np.ndarray | None,
    desc: str,
) -> torch.Tensor:
    """`through` each dihedral view of `index` rows of the training cache (or of `images`), in eval mode and the
    inference autocast: (N, len(views), ...) on the host."""
    ctx.model.eval()
    out = []
    for x, _ in bar(eval_loader(ctx, size, index, images), desc=desc, unit="batch"):
        x, got = to_device(x, ctx.device), []
        for k in views:
            with autocast(ctx.device, ctx.precision.infer):
                got.append(through(dihedral(x, k)))
        out.append(torch.stack(got, 1).cpu())
    return torch.cat(out)


def features_dir(ctx: FoldContext, stage_i: int) -> Path:
    """Where stage `stage_i`'s precomputed inputs live: the run's folder, shared by its folds, while every stage before
    it trained the head alone on precomputed features (the rest is still the pretrained backbone); else the fold's."""
    shared = all(s.kind in (SOLVED_HEAD, HEAD_ON_FEATURES) for s in ctx.recipe.stages[:stage_i])
    return ctx.run.dir / paths.FEATURES if shared else ctx.dir / paths.FEATURES


def features_for(ctx: FoldContext, stage_i: int) -> torch.Tensor:
    """Features of every training image; shared by all folds of a run while the backbone is still the pretrained one."""
    recipe = ctx.recipe
    stage = recipe.stages[stage_i]
    views = "d4" if recipe.precompute_d4 else "id"
    path = features_dir(ctx, stage_i) / f"s{stage_i}-{stage.size}px-{views}-{len(ctx.labels)}.pt"
    if path.exists():
        return load_torch(path, "precomputed features")
    feats = pooled_features(ctx, stage.size, np.arange(len(ctx.labels)), tuple(DIHEDRAL) if views == "d4" else (0,))
    save_torch(path, feats)
    return feats


def frozen_maps(
    ctx: FoldContext, size: int, n_modules: int, index: np.ndarray, images: np.ndarray | None = None
) -> torch.Tensor:
    """The output of the first `n_modules` of body_sequence for every dihedral view, (N, 8, C, H, W): in the dtype
    of the forwards without gradients (bf16 or fp16: they come out of the frozen layers so), float32 otherwise."""
    modules = [m for _, m in body_sequence(ctx.model, "precompute")[:n_modules]]
    trunk = fixed_forward(ctx.engine, nn.Sequential(*modules), len(index) * len(DIHEDRAL), size)
    dtype = ctx.precision.infer or torch.float32
    return per_view(ctx, lambda x: trunk(x).to(dtype), size, index, tuple(DIHEDRAL), images, f"frozen maps {size}px")


@dataclasses.dataclass
class FrozenCut:
    """Stage `stage_i`'s frozen layer groups as the start of the body (`precompute` with `frozen_groups`): the first
    `n` modules of body_sequence run once per image and view, their maps are kept, and the rest trains on them."""

    ctx: FoldContext
    stage_i: int
    n: int

    @classmethod
    def of(cls, ctx: FoldContext, stage_i: int) -> FrozenCut:
        where = f"stages.{stage_i}.precompute"
        return cls(ctx, stage_i, frozen_prefix(ctx.model, ctx.groups, ctx.recipe.stages[stage_i].frozen_groups, where))

    @property
    def size(self) -> int:
        return self.ctx.recipe.stages[self.stage_i].size

    @functools.cached_property
    def top_modules(self) -> list[nn.Module]:
        """The body after the cut (found once: `top` runs on every training step)."""
        return [m for _, m in body_sequence(self.ctx.model, "precompute")[self.n :]]

    def top(self, x: torch.Tensor) -> torch.Tensor:
        """The network from the cut on: maps in, logits out."""
        for module in self.top_modules:
            x = module(x)
        return self.ctx.model.forward_head(x)

    def train_maps(self) -> torch.Tensor:
        """Maps of every training image (shared by the run's folds while the backbone is the pretrained one)."""
        return self._cached(f"maps{self.n}-d4-{len(self.ctx.labels)}", np.arange(len(self.ctx.labels)), None)

    def test_maps(self, images: np.ndarray, test_key: str) -> torch.Tensor:
        """Maps of the test images (`test_key`: their contents), computed once for every fold that shares them; with
        no key (photos of no competition: predict-images), computed and not stored."""
        if not test_key:
            return frozen_maps(self.ctx, self.size, self.n, np.arange(len(images)), images)
        return self._cached(f"test-maps{self.n}-d4-{test_key}", np.arange(len(images)), images)

    def _cached(self, name: str, index: np.ndarray, images: np.ndarray | None) -> torch.Tensor:
        path = features_dir(self.ctx, self.stage_i) / f"s{self.stage_i}-{self.size}px-{name}.pt"
        if path.exists():
            return load_torch(path, "precomputed maps")
        maps = frozen_maps(self.ctx, self.size, self.n, index, images)
        save_torch(path, maps)
        return maps

    def view_batches(self, maps: torch.Tensor, rows: np.ndarray, view: int) -> Iterator:
        """(maps, None) of `rows` in one dihedral view, in order, at the evaluation batch size."""
        step = self.ctx.recipe.batch_size * 2
        return ((maps[rows[i : i + step], view].float(), None) for i in range(0, len(rows), step))


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
    rather than confident, so the first unfrozen epochs are not spent undoing its confidence (docs/history.md: the
    transition).
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
    fit = fit_logistic(x_train, y_train, len(ctx.classes), c, ctx.recipe.seed, scoring="neg_log_loss")
    head.weight.copy_(torch.from_numpy(fit.weight))
    head.bias.copy_(torch.from_numpy(fit.bias))
    train_probs = torch.from_numpy(fit.logits(x_train)).softmax(-1).numpy()
    val_probs = torch.from_numpy(fit.logits(feats[ctx.val_idx, 0].numpy())).softmax(-1).numpy()
    val = val_scores(val_probs, ctx.labels[ctx.val_idx]) if len(ctx.val_idx) else NO_VALIDATION  # the full fit
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
