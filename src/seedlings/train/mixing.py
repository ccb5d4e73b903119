"""Mixup and cutmix of a training batch (Zhang et al. 2018; Yun et al. 2019), every random number drawn from (seed,
fold, epoch, step): a resumed epoch mixes exactly as the interrupted one did."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from seedlings.data.loaders import item_seed


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, mixup_alpha: float, cutmix_alpha: float, key: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(mixed images, labels a, labels b, weight of a): each image paired with the batch's mirror order (x[::-1]), by
    mixup (a weighted blend) or cutmix (a box of the partner's pixels; the weight is the area kept)."""
    rng = np.random.default_rng(item_seed(*key))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    partner = torch.arange(len(x) - 1, -1, -1)
    if not use_cutmix:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        return x * lam + x[partner] * (1 - lam), y, y[partner], lam
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    h, w = x.shape[-2:]
    ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[partner][..., top:bottom, left:right]
    kept = 1 - (bottom - top) * (right - left) / (h * w)  # the box clipped at the border: the weight is what is kept
    return mixed, y, y[partner], kept


def mixed_criterion(criterion: Callable, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> Callable:
    """The loss of a mixed batch: the two labels' losses weighted as the images were."""

    def loss(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return lam * criterion(logits, y_a.to(logits.device)) + (1 - lam) * criterion(logits, y_b.to(logits.device))

    return loss
