"""The training augmentation's family, said once for both data paths (albumentations in loaders.py, tensors on the
device in device_batches.py), and the dihedral group that the precomputed views and TTA share, with TTA's named view
sets (the `tta` choices)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

RATIO = (0.75, 1.333)  # the crop's aspect range, width / height (1.333: the CPU path's figures were measured so)
JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.1, "hue": 0.02, "p": 0.8}  # mild colour jitter

DIHEDRAL = range(8)  # the 8 orientations of a photo taken from above: 4 quarter turns, each mirrored or not


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Member k of the dihedral group on NCHW images: rotate k % 4 quarter turns, then flip left-right if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x


def view(x: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    """A TTA view of NCHW images: dihedral member k, at `scale` times their side (rounded to a multiple of 8, which
    suits every backbone's strides)."""
    if scale != 1.0:
        size = int(round(x.shape[-1] * scale / 8)) * 8
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return dihedral(x, k)


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
