"""Decode once: every image resized to one square size and stored as a uint8 memmap per split under data/cache/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from seedlings import paths
from seedlings.data.competition import Competition, listing_hash, parallel_imap, read_image
from seedlings.errors import UserError
from seedlings.storage import atomic_path, check_free_space, write_json

CACHE_VERSION = 2  # bump when the stored pixels would change for the same inputs (2: the mask at a bounded side)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Squash to size x size (the photos are near square); area filter to shrink, cubic to enlarge."""
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


# OpenCV HSV (hue 0-180) of the seedlings' leaves: yellow-green to blue-green, not too dark or grey
GREEN_LOW, GREEN_HIGH = (25, 40, 40), (95, 255, 255)
MIN_PLANT = 0.002  # a mask keeping less of the image than this found no plant: the image is kept as it is


# plant_mask's choices: the fraction of the background's brightness each keeps around the plant; none: the photo as is
BACKGROUND = {"none": None, "green": 0.0, "dim": 0.25}


def green_only(img: np.ndarray, background: float = 0.0) -> np.ndarray:
    """The plant on black: pixels outside the green HSV range set to 0, the mask closed and grown a little so that
    thin stems and leaf edges stay (plant_mask: green). `background` > 0 keeps that fraction of the gravel and
    soil's brightness instead (plant_mask: dim): the plant stands out and the grains' size, a cue to the photo's
    scale, stays."""
    mask = cv2.inRange(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), GREEN_LOW, GREEN_HIGH)
    k = max(3, round(min(img.shape[:2]) / 60) | 1)  # odd, about 1/60 of the side
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.dilate(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel), kernel)
    if (mask > 0).mean() < MIN_PLANT:
        return img
    keep = np.where(mask[..., None] > 0, 1.0, background).astype(np.float32)
    return (img * keep).round().astype(np.uint8)


MASK_SIDE = 1024  # px: the plant mask is found on the photo shrunk to this side (or to 4x the cache's size if larger)


def mask_side(size: int) -> int:
    """The longest side the plant mask is computed at for a cache of `size` px: large enough that the mask found
    there is the one found at full size (tests/test_data.py compares them on real photos upsampled), small enough
    that a 2,800 px photo costs each worker tens of MB, not hundreds."""
    return max(MASK_SIDE, 4 * size)


def shrunk(img: np.ndarray, side: int) -> np.ndarray:
    """The image with its longest side at most `side` (aspect kept, area filter); smaller images as they are."""
    h, w = img.shape[:2]
    if max(h, w) <= side:
        return img
    scale = side / max(h, w)
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def cached_pixels(img: np.ndarray, size: int, mask: str = "none") -> np.ndarray:
    """What the cache stores of a decoded photo: the plant mask (if any) at its bounded side, then size x size."""
    if BACKGROUND[mask] is not None:
        img = green_only(shrunk(img, mask_side(size)), BACKGROUND[mask])
    return resize_square(img, size)


def _load(path: Path, size: int, mask: str = "none") -> tuple[np.ndarray | None, str | None]:
    try:
        return cached_pixels(read_image(path), size, mask), None
    except UserError as e:
        return None, str(e)


@dataclass
class ImageCache:
    """Images of one split at one size: `images[i]` is (size, size, 3) uint8 RGB of `files[i]`."""

    images: np.ndarray
    files: list[str]
    bad: list[str]  # files that could not be decoded (skip_bad_images: true); their pixels are zeros


def cache_paths(comp: Competition, split: str, size: int, mask: str = "none") -> tuple[Path, Path]:
    files, folder = comp.split(split)
    key = listing_hash([folder / f for f in files], files, with_mtime=True)  # a changed file changes the key
    masked = "" if BACKGROUND[mask] is None else f"-{mask}"
    stem = f"{comp.root.resolve().name}-{key}-{split}-{size}px{masked}-v{CACHE_VERSION}"
    return paths.cache_dir() / f"{stem}.u8", paths.cache_dir() / f"{stem}.json"


def load_cache(
    comp: Competition, split: str, size: int, skip_bad_images: bool = False, mask: str = "none"
) -> ImageCache:
    """Open the cache of (dataset, split, size, plant mask), building it first when missing (on every core)."""
    data_path, meta_path = cache_paths(comp, split, size, mask)
    files, _ = comp.split(split)
    expected = max(1, len(files)) * size * size * 3
    # the .json is written last: its presence means the array is complete (unless something truncated it since)
    if (
        not meta_path.exists()
        or not data_path.exists()
        or data_path.stat().st_size != expected
        or not readable(meta_path)
    ):
        build_cache(comp, split, size, skip_bad_images, data_path, meta_path, mask)
    meta = json.loads(meta_path.read_text())
    if meta["bad"] and not skip_bad_images:
        raise UserError(meta["bad"][0]["error"] + " (the cache was built with skip_bad_images: true)")
    images = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(len(files), size, size, 3))
    return ImageCache(images, files, [b["file"] for b in meta["bad"]])


def readable(meta_path: Path) -> bool:
    try:
        return "bad" in json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError, TypeError):
        return False  # damaged: the cache is built again


def build_cache(
    comp: Competition,
    split: str,
    size: int,
    skip_bad_images: bool,
    data_path: Path,
    meta_path: Path,
    mask: str = "none",
    workers: int | None = None,
) -> None:
    """Decode, mask and resize every image of the split into `data_path` (uint8), on `workers` processes (None: every
    core), each holding one photo at a time."""
    files, folder = comp.split(split)
    bad = []
    # a memmap written past the disk's end dies by SIGBUS, without a word: its size is known, check it first
    check_free_space(data_path, max(1, len(files)) * size * size * 3)
    with atomic_path(data_path) as tmp:
        arr = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(1, len(files)), size, size, 3))
        loader = partial(_load, size=size, mask=mask)
        for i, (img, err) in enumerate(parallel_imap(loader, [folder / f for f in files], f"cache {split}", workers)):
            if err is not None:
                if not skip_bad_images:
                    raise UserError(err)
                bad.append({"file": files[i], "error": err})
                arr[i] = 0
            else:
                arr[i] = img
        arr.flush()
        del arr
    write_json(meta_path, {"files": len(files), "size": size, "split": split, "data": str(comp.root), "bad": bad})
