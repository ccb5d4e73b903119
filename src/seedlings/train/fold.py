"""What one fold's training and prediction read: data, split, model, layer groups, device, and their batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from seedlings.data.cache import ImageCache, load_cache
from seedlings.data.competition import Competition
from seedlings.data.device_batches import DeviceBatches
from seedlings.data.loaders import CachedImages, EpochSampler, eval_transform, make_loader, train_transform
from seedlings.errors import UserError
from seedlings.precision import Precision, choose_engine, choose_precision
from seedlings.recipe.schema import BODY_ON_MAPS
from seedlings.run import Run
from seedlings.train.model import create_model, frozen_prefix, layer_groups, model_mean_std
from seedlings.train.step import Select, autocast, batch_view_probs, to_device


@dataclass
class FoldContext:
    """Fold `fold` of `run`: its images, labels and split, the model, its layer groups and the device."""

    run: Run
    fold: int
    comp: Competition
    cache: ImageCache | None  # the training images, decoded once; None: a context that predicts other images only
    classes: list[str]  # what the model tells apart: the competition's species, or the recipe's `classes`
    labels: np.ndarray  # label of every training image (index into classes; -1: a species the run does not learn)
    train_idx: np.ndarray  # cache rows of this fold's training images
    val_idx: np.ndarray  # cache rows of its validation images (of the species it learns)
    predict_idx: np.ndarray  # cache rows it predicts out of fold: every validation image
    model: nn.Module
    groups: list[list[str]]  # parameter names per layer group, head last
    device: torch.device
    mean: tuple
    std: tuple
    precision: Precision  # what training and the forwards without gradients compute in on this device, chosen once
    engine: str = "torch"  # where the forwards through fixed weights run: onnx, torch or auto (precision.choose_engine)
    targets: np.ndarray | None = None  # (cache rows, classes) float32 training targets (teacher.py); None: the labels

    @property
    def recipe(self):
        return self.run.recipe

    @property
    def dir(self):
        return self.run.fold_dir(self.fold)

    def train_targets(self, rows: np.ndarray) -> np.ndarray:
        """What training rows are trained towards: their labels, or with a teacher a distribution over the classes."""
        return self.labels[rows] if self.targets is None else self.targets[rows]


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_fold(run: Run, fold: int, device: torch.device | None = None, training_images: bool = True) -> FoldContext:
    """Scan the data, load the folds and the cache, build the model (its new head seeded by (seed, fold)).
    training_images=False: no training cache read or built (predict-images predicts photos of its own)."""
    recipe = run.recipe
    if fold != run.full:
        run.check_fold(fold)
    comp = run.comp
    folds = run.fold_table
    cache = None
    if training_images:
        cache = load_cache(comp, "train", recipe.cache_size, recipe.skip_bad_images, recipe.plant_mask)
    good = ~np.isin(np.array(comp.train_files), cache.bad if cache else [])
    in_val = folds.fold.to_numpy() == fold
    device = device or pick_device()
    precision = choose_precision(recipe.precision, device)  # one the device cannot compute: refused before anything
    engine = choose_engine(recipe.engine, device, precision)
    torch.manual_seed(recipe.seed * 1000 + fold)  # the new head's initial weights
    # channels_last: 1.4x to 1.6x faster training of tf_efficientnet_lite0 on this 2-core CPU (make bench, three runs
    # in docs/results.md), the fast path on GPUs
    classes = learnt_classes(run)
    model = create_model(recipe, len(classes)).to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    mean, std = model_mean_std(model)
    groups = layer_groups(model, recipe.layer_groups)
    for i, stage in enumerate(recipe.stages):
        if stage.kind == BODY_ON_MAPS:  # frozen groups' maps: they must be where the model can be cut
            frozen_prefix(model, groups, stage.frozen_groups, f"stages.{i}.precompute")
    remap = np.array([classes.index(c) if c in classes else -1 for c in comp.classes])
    labels = remap[np.array(comp.train_labels, dtype=int)]
    learnt = labels >= 0
    train_idx = np.flatnonzero(good & ~in_val & learnt)
    if cache is not None and run.pseudo_path.exists():  # pseudo-labels: confident test images join the training
        cache, labels, train_idx = with_pseudo_labels(run, cache, labels, train_idx)
    return FoldContext(
        run=run,
        fold=fold,
        comp=comp,
        cache=cache,
        classes=classes,
        labels=labels,
        train_idx=train_idx,
        val_idx=np.flatnonzero(good & in_val & learnt),
        predict_idx=np.flatnonzero(good & in_val),
        model=model,
        groups=groups,
        device=device,
        mean=mean,
        std=std,
        precision=precision,
        engine=engine,
    )


def learnt_classes(run: Run) -> list[str]:
    """The species a run's models tell apart: the recipe's `classes` (each a species of the competition), or all."""
    unknown = [c for c in run.recipe.classes if c not in run.comp.classes]
    if unknown:
        raise UserError(f"classes: {unknown[0]!r} is not a species of {run.data} ({', '.join(run.comp.classes)})")
    return list(run.recipe.classes) or list(run.comp.classes)


def with_pseudo_labels(
    run: Run, cache: ImageCache, labels: np.ndarray, train_idx: np.ndarray
) -> tuple[ImageCache, np.ndarray, np.ndarray]:
    """The training cache with the pseudo-labelled test images appended (rows after the training images: never in a
    fold's validation), their labels and training rows."""
    recipe, comp = run.recipe, run.comp
    pseudo = pd.read_csv(run.pseudo_path)
    test = load_cache(comp, "test", recipe.cache_size, recipe.skip_bad_images, recipe.plant_mask)
    row = {f: i for i, f in enumerate(test.files)}
    unknown = [f for f in pseudo.file if f not in row]
    if unknown or not set(pseudo.species) <= set(comp.classes):
        raise UserError(f"{run.pseudo_path}: names {unknown[0] if unknown else 'a species'} this competition lacks; "
                        f"delete runs/{run.name} to make the round again")  # fmt: skip
    rows = np.array([row[f] for f in pseudo.file], dtype=int)
    images = np.concatenate([np.asarray(cache.images), np.asarray(test.images)[rows]])
    extra = np.array([comp.classes.index(s) for s in pseudo.species], dtype=labels.dtype)
    n = len(labels)
    merged = ImageCache(images, cache.files + list(pseudo.file), cache.bad)
    return merged, np.concatenate([labels, extra]), np.concatenate([train_idx, np.arange(n, n + len(rows))])


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
        x, n = to_device(x, ctx.device), len(x)
        full = full or n
        if ctx.device.type == "cuda" and n < full:
            x = to_device(torch.cat([x, x.new_zeros((full - n, *x.shape[1:]))]), ctx.device)
        yield x, n


@torch.no_grad()
def view_probs(
    ctx: FoldContext,
    forward: Callable,
    batches: Iterator,
    views: list[tuple[int, float]] | None = None,
    select: Select | None = None,
    stack: bool = False,
) -> torch.Tensor:
    """(views, N, classes) float32 softmax probabilities of `forward` over (x, _) batches of N inputs in all, each
    batch moved to the device (padded to one shape on CUDA), in each of `views` (step.batch_view_probs); without
    views, one: the batch as it is."""
    out = []
    for x, n in static_batches(ctx, batches):
        with autocast(ctx.device, ctx.precision.infer):
            p = forward(x).float().softmax(-1)[None] if views is None else batch_view_probs(forward, x, views, select,
                                                                                            stack)  # fmt: skip
        out.append(p[:, :n].cpu())
    return torch.cat(out, 1)


def augment_on_device(ctx: FoldContext) -> bool:
    choice = ctx.recipe.augment
    return choice == "tensor" or (choice == "auto" and ctx.device.type == "cuda")


def training_batches(ctx: FoldContext, size: int) -> tuple[Callable[[int], Iterator], int]:
    """(epoch -> training batches, batches per epoch): made on the device from the uploaded cache (tensor_aug), or
    by albumentations in the loader; both draw every random number from (seed, fold, epoch, item)."""
    recipe = ctx.recipe
    if augment_on_device(ctx):
        made = DeviceBatches(
            ctx.cache.images, ctx.train_idx, ctx.train_targets(ctx.train_idx), size, ctx.mean, ctx.std,
            recipe.crop_scale, recipe.seed, ctx.fold, recipe.batch_size, ctx.device,
            ctx.precision.train or torch.float32,
            drop_last=ctx.device.type == "cuda",  # static shapes: a ragged last batch re-tunes cuDNN (GPU only)
        )  # fmt: skip
        return made.epoch, len(made)
    transform = train_transform(size, ctx.mean, ctx.std, recipe.crop_scale)
    ds = CachedImages(ctx.cache.images, ctx.train_idx, ctx.train_targets(ctx.train_idx), transform)
    sampler = EpochSampler(len(ds), recipe.seed, ctx.fold)
    loader = make_loader(ds, recipe.batch_size, ctx.device, sampler, recipe.num_workers)

    def batches(epoch: int) -> Iterator:
        sampler.set_epoch(epoch)
        return iter(loader)

    return batches, len(loader)
