"""Datasets over the decode-once cache, albumentations pipelines, loaders whose randomness is (seed, fold, epoch)."""

from __future__ import annotations

import os

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from seedlings.data.augment import JITTER, RATIO
from seedlings.defaults import parallel_jobs
from seedlings.recipe.choices import CROP_SCALE


def item_seed(*key: int) -> int:
    """A 32-bit seed from integers (seed, fold, epoch, index): same key, same augmentation, in any worker."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def train_transform(size: int, mean: tuple, std: tuple, crop_scale: float = CROP_SCALE) -> A.Compose:
    """Random crop and all 8 dihedral orientations (the photos are taken from above), mild colour jitter."""
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(crop_scale, 1.0), ratio=RATIO),
        A.HorizontalFlip(),
        A.VerticalFlip(),
        A.RandomRotate90(),
        A.ColorJitter(**JITTER),
        A.Normalize(mean=mean, std=std),
    ])  # fmt: skip


def eval_transform(size: int, mean: tuple, std: tuple) -> A.Compose:
    # the cache is larger than `size` (cache_margin): shrinking by area averaging, like the cache itself
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_AREA), A.Normalize(mean=mean, std=std)])


class CachedImages(Dataset):
    """Images from an ImageCache (rows `index`) with labels; items are (CHW float tensor, label): a class index, or
    a float32 distribution over the classes where `labels` has a row per image (distillation's targets)."""

    def __init__(self, images: np.ndarray, index: np.ndarray, labels: np.ndarray | None, transform: A.Compose):
        self.images, self.index, self.transform = images, np.asarray(index), transform
        self.labels = np.full(len(self.index), -1) if labels is None else np.asarray(labels)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            self.transform.set_random_seed(seed)  # per-item seed: batches replay exactly on resume
        x = self.transform(image=np.asarray(self.images[self.index[i]]))["image"]
        y = self.labels[i]
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(y) if y.ndim else int(y)


class EpochSampler(Sampler):
    """Shuffles by (seed, fold, epoch) and hands each index its own augmentation seed."""

    def __init__(self, n: int, seed: int, fold: int):
        self.n, self.seed, self.fold, self.epoch = n, seed, fold, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.fold, self.epoch])
        order = rng.permutation(self.n)
        return iter([(int(i), item_seed(self.seed, self.fold, self.epoch, int(i))) for i in order])


def batch_slices(n: int, batch_size: int, drop_last: bool = False) -> list[slice]:
    """An epoch's batches as slices of its order. A last batch of one image joins the batch before it (a batch norm
    that follows the batches cannot normalise one image, on any device); with drop_last a short last batch is left out
    (static shapes on CUDA)."""
    slices = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if drop_last and len(slices) > 1 and n % batch_size:
        slices.pop()
    elif len(slices) > 1 and slices[-1].stop - slices[-1].start == 1:
        last = slices.pop()
        slices[-1] = slice(slices[-1].start, last.stop)
    return slices


class EpochBatches(Sampler):
    """EpochSampler's items in batches (batch_slices): a DataLoader's batch_sampler."""

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool = False):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def __len__(self) -> int:
        return len(batch_slices(len(self.sampler), self.batch_size, self.drop_last))

    def __iter__(self):
        items = list(self.sampler)
        return iter([items[s] for s in batch_slices(len(items), self.batch_size, self.drop_last)])


def default_workers(device: torch.device) -> int:
    """No workers on CPU (the model needs every core; decoding is already done), up to 8 on CUDA, shared out
    between the folds trained at once."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // parallel_jobs()))


def make_loader(
    ds: Dataset,
    batch_size: int,
    device: torch.device,
    sampler: Sampler | None = None,
    num_workers: int = -1,
    drop_last: bool = False,
) -> DataLoader:
    workers = default_workers(device) if num_workers < 0 else num_workers
    # its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG at every epoch,
    # which would shift dropout masks between otherwise identical runs (our randomness comes from EpochSampler)
    common = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
              "generator": torch.Generator().manual_seed(0)}  # fmt: skip
    if sampler is not None:  # training: batches that never leave one image alone
        return DataLoader(ds, batch_sampler=EpochBatches(sampler, batch_size, drop_last), **common)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=drop_last, **common)
