"""Does the plant mask found at a bounded side (data/cache.py: mask_side) match the one found at full size?

Real photos (the shared 150 px ones) are upsampled to a full-size photo's side, with and without sensor noise; the
mask is found at full size and at the bounded side and both are compared at the cache's 192 px. Prints the agreement
of the masks, the cached pixels' difference, and the share of the photo each mask keeps.

    .venv/bin/python scripts/mask_agreement.py [--side 2800] [--noise 0 4] [--photos 60] [--data DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from seedlings.data.cache import GREEN_HIGH, GREEN_LOW, cached_pixels, green_only, mask_side, resize_square, shrunk
from seedlings.data.competition import read_image

SIZE = 192  # configs/cpu.yaml's stage size


def plant_mask(img: np.ndarray) -> np.ndarray:
    """green_only's mask alone, at the photo's own side."""
    mask = cv2.inRange(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), GREEN_LOW, GREEN_HIGH)
    k = max(3, round(min(img.shape[:2]) / 60) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.dilate(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel), kernel) > 0


def at_cache_size(mask: np.ndarray) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/seedlings-150", help="a competition folder of real photos")
    parser.add_argument("--side", type=int, default=2800, help="px, the upsampled photos' width (height 0.76 of it)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 4.0], help="sensor noise (std, grey levels)")
    parser.add_argument("--photos", type=int, default=60, help="photos, spread over the species")
    args = parser.parse_args()
    files = sorted(Path(args.data).glob("train/*/*.png"))
    files = files[:: max(1, len(files) // args.photos)][: args.photos]
    height = round(args.side * 0.76)
    print(f"{len(files)} photos of {args.data} upsampled to {args.side}x{height}; mask side {mask_side(SIZE)} px")
    for noise in args.noise:
        rng = np.random.default_rng(0)
        agree, diff, kept = [], [], {"original": [], "full size": [], "bounded": []}
        for path in files:
            photo = read_image(path)
            big = cv2.resize(photo, (args.side, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
            big = np.clip(big + rng.standard_normal(big.shape, dtype=np.float32) * noise, 0, 255).round()
            big = big.astype(np.uint8)
            full, bounded = plant_mask(big), plant_mask(shrunk(big, mask_side(SIZE)))
            agree.append((at_cache_size(full) == at_cache_size(bounded)).mean())
            old = resize_square(green_only(big, 0.25), SIZE)  # the mask at full size, as the cache found it before
            diff.append(np.abs(old.astype(np.int16) - cached_pixels(big, SIZE, "dim")).mean())
            for key, mask in (("original", plant_mask(photo)), ("full size", full), ("bounded", bounded)):
                kept[key].append(mask.mean())
        shares = ", ".join(f"{k} {np.mean(v):.3f}" for k, v in kept.items())
        print(f"noise {noise:g}: masks agree on {np.mean(agree):.4f} of the {SIZE} px pixels (least {min(agree):.4f});"
              f" cached pixels differ by {np.mean(diff):.2f} grey levels on average (most {np.max(diff):.2f});"
              f" share of the photo kept: {shares}")  # fmt: skip


if __name__ == "__main__":
    main()
