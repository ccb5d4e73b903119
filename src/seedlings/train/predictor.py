"""A fold's trained model asked for probabilities of views of images: the one place prediction is run, through the
network, or, when the last stage trained on its frozen groups' precomputed maps and the views are that stage's own
(dihedral, at its size), from those maps: the same probabilities without running the frozen layers again."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch

from seedlings.data.augment import view
from seedlings.precision import runs_onnx
from seedlings.progress import bar
from seedlings.recipe.schema import BODY_ON_MAPS
from seedlings.train.engine import OnnxForward
from seedlings.train.features import FrozenCut
from seedlings.train.fold import FoldContext, eval_loader, view_probs

Views = list[tuple[int, float]]  # (dihedral member, scale) of each view


def map_view(maps: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    """Dihedral view k of a batch of maps (N, 8, C, H, W): read, not computed; maps have no other scale."""
    return maps[:, k].float().contiguous(memory_format=torch.channels_last)


class Predictor:
    """The probabilities of a fold's model (its weights as loaded in ctx.model) for views of its training images or
    of `test_images` (a cache's images; `test_key`: their contents, naming their stored maps; none: not stored).
    through_network: never from the maps (how the network itself predicts them, to compare)."""

    def __init__(
        self, ctx: FoldContext, test_images: np.ndarray | None = None, test_key: str = "", through_network: bool = False
    ):
        self.ctx, self.test_images, self.test_key = ctx, test_images, test_key
        last = len(ctx.recipe.stages) - 1
        on_maps = ctx.recipe.stages[last].kind == BODY_ON_MAPS and not through_network
        self.cut = FrozenCut.of(ctx, last) if on_maps else None
        self.onnx = OnnxForward(ctx.model)  # exported when first asked, and again when another member's weights load

    def reads_maps(self, views: Views, size: int) -> bool:
        return self.cut is not None and size == self.cut.size and all(scale == 1.0 for _, scale in views)

    @functools.cached_property
    def train_maps(self) -> torch.Tensor:  # read once for every member of the fold
        return self.cut.train_maps()

    @functools.cached_property
    def test_maps(self) -> torch.Tensor:
        return self.cut.test_maps(self.test_images, self.test_key)

    def probs(self, split: str, rows: np.ndarray, views: Views, size: int = 0) -> torch.Tensor:
        """(views, len(rows), classes) float32 probabilities of `rows` of the training images (split "train") or of
        the test images ("test"), each view at `size` px (0: the recipe's prediction size)."""
        ctx = self.ctx
        size = size or ctx.recipe.eval_size
        ctx.model.eval()
        if self.reads_maps(views, size):
            maps = self.train_maps if split == "train" else self.test_maps
            return view_probs(ctx, self.cut.top, map_batches(ctx, maps, rows), views, map_view)
        images = None if split == "train" else self.test_images
        batches = bar(eval_loader(ctx, size, rows, images), desc=f"predict {split} {size}px", unit="batch")
        network = self.onnx if runs_onnx(ctx.engine, len(rows) * len(views), size) else ctx.model
        return view_probs(ctx, network, batches, views, view, stack=ctx.device.type == "cuda")


def map_batches(ctx: FoldContext, maps: torch.Tensor, rows: np.ndarray) -> Iterator:
    """(maps of every view, None) of `rows`, in order, at the evaluation batch size."""
    step = ctx.recipe.batch_size * 2
    return ((maps[rows[i : i + step]], None) for i in range(0, len(rows), step))
