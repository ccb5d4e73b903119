"""Test-time augmentation: the views of a named TTA set (data/augment.py: the 8 dihedral orientations, photos being
taken from above, and an extra scale), and their probabilities averaged (arithmetic or geometric)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from seedlings.data.augment import TTA_VIEWS, view
from seedlings.errors import UserError
from seedlings.metrics import MEANS
from seedlings.train.step import batch_view_probs


def tta_views(name: str) -> list[tuple[int, float]]:
    """(dihedral member, scale) pairs of a named TTA set."""
    if name not in TTA_VIEWS:
        raise UserError(f"tta: expected {' or '.join(TTA_VIEWS)}, got {name!r}")
    return list(TTA_VIEWS[name])


@torch.no_grad()
def tta_predict(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    name: str = "d4",
    mean: str = "arith",
    stack: bool = False,
) -> torch.Tensor:
    """Softmax probabilities of one batch averaged over the views of TTA set `name` (see step.batch_view_probs for
    `stack`)."""
    return mean_of_views(batch_view_probs(forward, x, tta_views(name), view, stack), mean)


def mean_of_views(p: torch.Tensor, mean: str = "arith") -> torch.Tensor:
    """(views, N, classes) probabilities averaged over the views: arithmetic, or geometric renormalised to sum to 1."""
    return MEANS[mean](p)
