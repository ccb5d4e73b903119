"""Test-time augmentation: the 8 dihedral orientations (photos are taken from above) and an extra scale."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from seedlings.data.augment import DIHEDRAL, dihedral
from seedlings.errors import UserError
from seedlings.metrics import PROB_FLOOR

FLIPS = (0, 4, 6, 2)  # identity, left-right flip, up-down flip (half a turn, then left-right), half a turn
ZOOM = 1.15  # d4+scales: the second scale of every view, px / px (a closer look, like a tighter training crop)


# the `tta` choices: (dihedral member, scale) of each view; d2 is the four-element subgroup of d4 (as is, mirrored
# left-right, upside down, half a turn)
TTA_VIEWS = {
    "none": ((0, 1.0),),
    "flip": ((0, 1.0), (4, 1.0)),
    "d2": tuple((k, 1.0) for k in FLIPS),
    "d4": tuple((k, 1.0) for k in DIHEDRAL),
    "d4+scales": tuple((k, s) for s in (1.0, ZOOM) for k in DIHEDRAL),
}


def tta_views(name: str) -> list[tuple[int, float]]:
    """(dihedral member, scale) pairs of a named TTA set."""
    if name not in TTA_VIEWS:
        raise UserError(f"tta: expected {' or '.join(TTA_VIEWS)}, got {name!r}")
    return list(TTA_VIEWS[name])


def view(x: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    if scale != 1.0:
        size = int(round(x.shape[-1] * scale / 8)) * 8  # multiples of 8 suit every backbone's strides
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return dihedral(x, k)


@torch.no_grad()
def tta_predict(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    name: str = "d4",
    mean: str = "arith",
    stack: bool = False,
) -> torch.Tensor:
    """Average softmax probabilities over the views of one batch.

    stack: the views of each scale in one forward (the GPU path: one large batch keeps the device busy). Off, one
    forward per view at the loader's batch size: stacking all 8 views ran 1.8x slower on this 2-core CPU (batch 512
    against 32, tf_efficientnet_lite0 at 160 px).
    """
    views = tta_views(name)
    if stack:
        logits = []
        for scale in dict.fromkeys(s for _, s in views):  # views of one scale share a shape
            ks = [k for k, s in views if s == scale]
            logits += forward(torch.cat([view(x, k, scale) for k in ks])).float().split(len(x))
        p = torch.stack(logits).softmax(-1)
    else:
        p = torch.stack([forward(view(x, k, scale)).float().softmax(-1) for k, scale in views])
    return mean_of_views(p, mean)


def geometric_mean(p: torch.Tensor) -> torch.Tensor:
    g = torch.exp(torch.log(p.clamp_min(PROB_FLOOR)).mean(0))
    return g / g.sum(-1, keepdim=True)  # renormalised to sum to 1


MEANS = {"arith": lambda p: p.mean(0), "geom": geometric_mean}  # the `tta_mean` choices


def mean_of_views(p: torch.Tensor, mean: str = "arith") -> torch.Tensor:
    """(views, N, classes) probabilities averaged over the views: arithmetic, or geometric renormalised to sum to 1."""
    return MEANS[mean](p)
