"""What one fold's training and prediction read (data, model, layer groups, device), and the step they share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from seedlings.cache import ImageCache, load_cache
from seedlings.data import CachedImages, eval_transform, make_loader
from seedlings.folds import load_folds
from seedlings.images import Competition, scan_competition
from seedlings.model import create_model, layer_groups, model_mean_std
from seedlings.run import Run


@dataclass
class FoldContext:
    """Fold `fold` of `run`: its images, labels and split, the model, its layer groups and the device."""

    run: Run
    fold: int
    comp: Competition
    cache: ImageCache  # the training images, decoded once
    labels: np.ndarray  # label of every training image (index into comp.classes)
    train_idx: np.ndarray  # cache rows of this fold's training images
    val_idx: np.ndarray  # cache rows of its validation images
    model: nn.Module
    groups: list[list[str]]  # parameter names per layer group, head last
    device: torch.device
    mean: tuple
    std: tuple

    @property
    def recipe(self):
        return self.run.recipe

    @property
    def dir(self):
        return self.run.fold_dir(self.fold)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_fold(run: Run, fold: int, device: torch.device | None = None) -> FoldContext:
    """Scan the data, load the folds and the cache, build the model (its new head seeded by (seed, fold))."""
    recipe = run.recipe
    run.check_fold(fold)
    comp = scan_competition(run.data)
    folds = load_folds(run.data, run.n_folds, run.fold_seed)
    cache = load_cache(comp, "train", recipe.cache_size, recipe.skip_bad_images)
    good = ~np.isin(np.array(comp.train_files), cache.bad)
    in_val = folds.fold.to_numpy() == fold
    device = device or pick_device()
    torch.manual_seed(recipe.seed * 1000 + fold)  # the new head's initial weights
    # channels_last: 1.4x to 1.6x faster training of tf_efficientnet_lite0 on this 2-core CPU (make bench, three runs
    # in the README), the fast path on GPUs
    model = create_model(recipe, len(comp.classes)).to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    mean, std = model_mean_std(model)
    return FoldContext(
        run=run,
        fold=fold,
        comp=comp,
        cache=cache,
        labels=np.array(comp.train_labels),
        train_idx=np.flatnonzero(good & ~in_val),
        val_idx=np.flatnonzero(good & in_val),
        model=model,
        groups=layer_groups(model, recipe.layer_groups),
        device=device,
        mean=mean,
        std=std,
    )


def autocast(ctx: FoldContext):
    if ctx.device.type == "cuda" and ctx.recipe.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(ctx: FoldContext, x: torch.Tensor) -> torch.Tensor:
    x = x.to(ctx.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def train_step(
    ctx: FoldContext, forward: Callable, optimizer: torch.optim.Optimizer, criterion: Callable, x, y
) -> torch.Tensor:
    """One optimizer step on one batch (training, the LR finder and the benchmark all take it); returns the batch's
    mean loss as a tensor on the device (reading it is a host sync: the caller decides when)."""
    x, y = to_device(ctx, x), y.to(ctx.device, non_blocking=True)
    with autocast(ctx):
        loss = criterion(forward(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def eval_loader(ctx: FoldContext, size: int, index: np.ndarray, images: np.ndarray | None = None):
    """Batches of `index` rows of the training cache (or of `images`), resized to `size`, in order."""
    ds = CachedImages(
        ctx.cache.images if images is None else images,
        index,
        ctx.labels[index] if images is None else None,
        eval_transform(size, ctx.mean, ctx.std),
    )
    return make_loader(ds, ctx.recipe.batch_size * 2, ctx.device, num_workers=ctx.recipe.num_workers)


def static_batches(ctx: FoldContext, batches: Iterator) -> Iterator[tuple[torch.Tensor, int]]:
    """(x on the device, real rows): on CUDA a short last batch is padded to the first one's size, so every forward
    has one shape (a new shape re-tunes cuDNN and recompiles a compiled model)."""
    full = None
    for x, _ in batches:
        x, n = to_device(ctx, x), len(x)
        full = full or n
        if ctx.device.type == "cuda" and n < full:
            x = torch.cat([x, x.new_zeros((full - n, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)
        yield x, n


@torch.no_grad()
def predict_probs(ctx: FoldContext, forward: Callable, batches: Iterator) -> np.ndarray:
    """Softmax probabilities of `forward` over (x, _) batches, as one float32 array."""
    out = []
    for x, n in static_batches(ctx, batches):
        with autocast(ctx):
            out.append(forward(x)[:n].float().softmax(-1).cpu())
    return torch.cat(out).numpy()
