"""The training augmentation's family, said once for both data paths (albumentations in loaders.py, tensors on the
device in device_batches.py), and the dihedral group that TTA and the precomputed views share."""

from __future__ import annotations

import torch

CROP_SCALE = 0.8  # RandomResizedCrop's smallest area fraction: 0.35 cost 6 points at unfreezing (docs/history.md)
RATIO = (0.75, 1.333)  # the crop's aspect range, width / height (1.333: the CPU path's figures were measured so)
JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.1, "hue": 0.02, "p": 0.8}  # mild colour jitter

DIHEDRAL = range(8)  # the 8 orientations of a photo taken from above: 4 quarter turns, each mirrored or not


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Member k of the dihedral group on NCHW images: rotate k % 4 quarter turns, then flip left-right if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x
