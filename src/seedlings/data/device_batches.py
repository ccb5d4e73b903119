"""Training batches made on the device: the decode-once uint8 cache uploaded once per fold and stage, each batch's
crop, dihedral turn and flip as one affine resample (`grid_sample`), colour jitter and normalisation as batched tensor
operations.

The same augmentation family as loaders.train_transform (augment.py: a crop of area [crop_scale, 1] and aspect RATIO,
the 8 dihedral orientations, JITTER), with every random number drawn on the host from the same (seed, fold, epoch,
item) seeds as EpochSampler: resume replays identical batches. The code
runs on CPU tensors too (tests); on a CPU the albumentations loader stays the default (docs/recipe.md: which data
path runs where).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from seedlings.data.augment import JITTER, RATIO
from seedlings.data.loaders import batch_slices, item_seed
from seedlings.errors import UserError

# output (u, v) -> source direction for each dihedral member k: rotate k % 4 quarter turns, mirror when k >= 4
DIHEDRAL_MATRICES = [
    np.array([[1, 0], [0, 1]]),
    np.array([[0, -1], [1, 0]]),
    np.array([[-1, 0], [0, -1]]),
    np.array([[0, 1], [-1, 0]]),
]


def dihedral_matrix(k: int) -> np.ndarray:
    m = DIHEDRAL_MATRICES[k % 4]
    return m @ np.array([[-1, 0], [0, 1]]) if k >= 4 else m


@dataclass
class ItemParams:
    """One item's augmentation: the crop (fractions of the source side), dihedral member, jitter factors."""

    x0: float
    y0: float
    w: float
    h: float
    k: int
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation factors; hue shift (turns)


def sample_item(seed: int, crop_scale: float) -> ItemParams:
    """RandomResizedCrop's sampling (area, then log-uniform aspect, 10 tries, then the whole image), continuous."""
    rng = np.random.default_rng(seed)
    box = None
    for _ in range(10):
        area = rng.uniform(crop_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if w <= 1 and h <= 1:
            box = (rng.uniform(0, 1 - w), rng.uniform(0, 1 - h), w, h)
            break
    box = box or (0.0, 0.0, 1.0, 1.0)
    k = int(rng.integers(8))
    jitter = None
    if rng.uniform() < JITTER["p"]:
        b, c, s = (rng.uniform(1 - JITTER[n], 1 + JITTER[n]) for n in ("brightness", "contrast", "saturation"))
        jitter = (b, c, s, rng.uniform(-JITTER["hue"], JITTER["hue"]))
    return ItemParams(*box, k, jitter)


def affine_thetas(params: list[ItemParams]) -> torch.Tensor:
    """(B, 2, 3) for F.affine_grid: output coordinates in [-1, 1] -> the source point of the crop, turned."""
    out = np.zeros((len(params), 2, 3), np.float32)
    for i, p in enumerate(params):
        scale = np.diag([p.w, p.h])  # half-extent of the crop in normalised source units (the source spans 2)
        out[i, :, :2] = scale @ dihedral_matrix(p.k)
        out[i, :, 2] = [2 * p.x0 + p.w - 1, 2 * p.y0 + p.h - 1]  # the crop's centre
    return torch.from_numpy(out)


GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as OpenCV's RGB2GRAY
TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
FROM_YIQ = torch.linalg.inv(TO_YIQ)  # computed once, not per batch


def colour_jitter(x: torch.Tensor, params: list[ItemParams]) -> torch.Tensor:
    """Brightness, contrast, saturation, hue on (B, 3, H, W) in [0, 1], per item; items without jitter unchanged."""
    table = torch.tensor([p.jitter or (1.0, 1.0, 1.0, 0.0) for p in params], dtype=x.dtype, device=x.device)
    b, c, s, hue = (table[:, i].view(-1, 1, 1, 1) for i in range(4))
    grey_w = GREY.to(x).view(1, 3, 1, 1)
    x = (x * b).clamp(0, 1)
    mean = (x * grey_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    grey = (x * grey_w).sum(1, keepdim=True)
    x = ((x - grey) * s + grey).clamp(0, 1)
    return rotate_hue(x, hue.view(-1)).clamp(0, 1)


def rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Hue shift as a rotation of the chroma plane around the grey axis (YIQ), in the direction of HSV's hue: one
    3x3 matrix per item."""
    to_yiq, from_yiq = TO_YIQ.to(x), FROM_YIQ.to(x)
    cos, sin = torch.cos(2 * math.pi * turns), torch.sin(2 * math.pi * turns)
    rot = torch.zeros(len(turns), 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, sin, -sin, cos  # positive: red towards yellow
    m = from_yiq @ rot @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)


class DeviceBatches:
    """A stage's training batches, made on `device` from the rows `index` of a uint8 cache (N, S, S, 3)."""

    def __init__(
        self,
        images: np.ndarray,
        index: np.ndarray,
        labels: np.ndarray,
        size: int,
        mean: tuple,
        std: tuple,
        crop_scale: float,
        seed: int,
        fold: int,
        batch_size: int,
        device: torch.device,
        out_dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
    ):
        rows = np.ascontiguousarray(images[np.asarray(index)])
        if device.type == "cuda":  # several folds may share one GPU (make -j 3 train GPUS="0 0 0"): plan for it
            free, _ = torch.cuda.mem_get_info(device)
            if rows.nbytes > free / 2:
                raise UserError(
                    f"augment: tensor: the fold's {rows.nbytes / 2**30:.1f} GiB of cached images would take over half "
                    f"of the GPU's {free / 2**30:.1f} GiB free; train fewer folds at once or use augment=albumentations"
                )
        # uploaded once: (n, S, S, 3) uint8 is 4x smaller than the float images it becomes
        self.images = torch.from_numpy(rows).to(device)
        labels = np.asarray(labels)  # class indices, or a distribution per row (distillation's targets)
        self.labels = torch.as_tensor(labels, dtype=torch.long if labels.ndim == 1 else torch.float32, device=device)
        self.size, self.crop_scale, self.seed, self.fold = size, crop_scale, seed, fold
        self.batch_size, self.device, self.out_dtype, self.drop_last = batch_size, device, out_dtype, drop_last
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(batch_slices(len(self.labels), self.batch_size, self.drop_last))

    def order(self, epoch: int) -> np.ndarray:
        """EpochSampler's order for the same (seed, fold, epoch)."""
        return np.random.default_rng([self.seed, self.fold, epoch]).permutation(len(self.labels))

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(epoch)
        for batch in batch_slices(len(order), self.batch_size, self.drop_last):
            rows = order[batch]
            params = [sample_item(item_seed(self.seed, self.fold, epoch, int(i)), self.crop_scale) for i in rows]
            rows_t = torch.from_numpy(rows).to(self.device)
            yield self.augment(self.images[rows_t], params), self.labels[rows_t]

    def augment(self, batch: torch.Tensor, params: list[ItemParams]) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, size, size) normalised, channels_last, in out_dtype."""
        x = batch.permute(0, 3, 1, 2).float().div_(255)
        theta = affine_thetas(params).to(self.device)
        grid = F.affine_grid(theta, [len(params), 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        x = colour_jitter(x, params)
        x = (x - self.mean) / self.std
        return x.to(self.out_dtype).contiguous(memory_format=torch.channels_last)
