"""A generated competition with the real layout: 12 species drawn procedurally on gravel, real class imbalance."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from seedlings.data.competition import REAL_TEST_IMAGES, REAL_TRAIN_COUNTS
from seedlings.errors import UserError

TEST_FRACTION = REAL_TEST_IMAGES / sum(REAL_TRAIN_COUNTS.values())  # real test/train ratio


@dataclass(frozen=True)
class Look:
    """How one species is drawn; ranges overlap between species so that the task is learnable, not trivial."""

    leaves: tuple[int, int]  # leaves per plant
    length: tuple[float, float]  # leaf length, fraction of the plant radius
    aspect: tuple[float, float]  # leaf length / width
    lobes: int  # bumps along each leaf edge (0: smooth)
    lobe_depth: float  # bump depth, fraction of the leaf width
    hue: float  # OpenCV hue (0-180; green is about 35-75)
    sat: float  # 0-255
    val: float  # 0-255
    tip: float  # width profile exponent: >1 pointed, <1 blunt
    centre: tuple[int, int, int]  # RGB colour of the stem centre


LOOKS = {
    "Black-grass": Look((2, 4), (0.8, 1.0), (12, 18), 0, 0.0, 62, 150, 90, 1.6, (70, 60, 50)),
    "Charlock": Look((2, 4), (0.45, 0.6), (1.3, 1.7), 3, 0.18, 52, 170, 140, 0.7, (90, 120, 60)),
    "Cleavers": Look((6, 8), (0.35, 0.5), (3.5, 5.0), 0, 0.0, 58, 160, 110, 1.3, (80, 110, 60)),
    "Common Chickweed": Look((8, 14), (0.2, 0.3), (1.6, 2.2), 0, 0.0, 48, 140, 170, 0.9, (120, 160, 90)),
    "Common wheat": Look((1, 3), (0.85, 1.0), (10, 15), 0, 0.0, 45, 120, 150, 1.4, (140, 150, 100)),
    "Fat Hen": Look((4, 6), (0.4, 0.55), (1.4, 1.9), 2, 0.25, 60, 80, 140, 1.5, (110, 130, 110)),
    "Loose Silky-bent": Look((4, 8), (0.7, 1.0), (18, 26), 0, 0.0, 50, 110, 160, 1.5, (140, 150, 110)),
    "Maize": Look((2, 4), (0.8, 1.0), (5, 7), 0, 0.0, 55, 150, 130, 1.2, (120, 140, 80)),
    "Scentless Mayweed": Look((5, 9), (0.5, 0.7), (6, 9), 7, 0.6, 57, 150, 120, 1.1, (90, 110, 70)),
    "Shepherds Purse": Look((6, 10), (0.45, 0.6), (3.0, 4.0), 4, 0.35, 56, 120, 110, 1.1, (90, 100, 70)),
    "Small-flowered Cranesbill": Look((3, 6), (0.35, 0.5), (1.0, 1.3), 5, 0.22, 54, 140, 120, 0.6, (150, 60, 60)),
    "Sugar beet": Look((2, 4), (0.5, 0.65), (1.8, 2.3), 0, 0.0, 50, 170, 100, 0.8, (160, 50, 60)),
}


def gravel(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A soil-and-stones background, drawn small and upscaled (large images stay cheap)."""
    scale = min(1.0, 256 / max(w, h))
    sw, sh = max(8, int(w * scale)), max(8, int(h * scale))
    base = np.array([rng.uniform(90, 130), rng.uniform(80, 110), rng.uniform(60, 90)])  # RGB brown-grey
    img = np.empty((sh, sw, 3), np.float32)
    img[:] = base
    for _ in range(int(sw * sh / 40)):
        c = base + rng.normal(0, 22) + rng.normal(0, 5, 3)  # stones: lighter or darker, barely tinted
        cv2.circle(img, (int(rng.integers(0, sw)), int(rng.integers(0, sh))), int(rng.integers(1, 4)), c.tolist(), -1)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return img


def leaf_polygon(rng: np.random.Generator, look: Look, radius: float, angle: float, centre: np.ndarray) -> np.ndarray:
    length = radius * rng.uniform(*look.length)
    width = length / rng.uniform(*look.aspect)
    t = np.linspace(0, 1, 40)
    half = 0.5 * width * np.sin(np.pi * t) ** look.tip
    if look.lobes:
        half = half * (1 + look.lobe_depth * np.sin(look.lobes * 2 * np.pi * t + rng.uniform(0, np.pi)))
    bend = rng.normal(0, 0.15) * length * t**2  # leaves curve a little
    x = np.concatenate([t * length, t[::-1] * length])
    y = np.concatenate([half + bend, -half[::-1] + bend[::-1]])
    c, s = np.cos(angle), np.sin(angle)
    pts = np.stack([c * x - s * y, s * x + c * y], 1) + centre
    return pts.astype(np.int32)


def draw_plant(rng: np.random.Generator, look: Look, w: int, h: int) -> np.ndarray:
    img = gravel(rng, w, h)
    side = min(w, h)
    radius = side * rng.uniform(0.3, 0.48)
    centre = np.array([w / 2, h / 2]) + rng.normal(0, side * 0.06, 2)
    n = int(rng.integers(look.leaves[0], look.leaves[1] + 1))
    start = rng.uniform(0, 2 * np.pi)
    thickness = max(1, side // 150)
    for i in range(n):
        angle = start + 2 * np.pi * i / n + rng.normal(0, 0.35)
        hsv = np.uint8(
            [
                [
                    [
                        np.clip(look.hue + rng.normal(0, 4), 0, 179),
                        np.clip(look.sat + rng.normal(0, 20), 0, 255),
                        np.clip(look.val + rng.normal(0, 20), 30, 255),
                    ]
                ]
            ]
        )
        colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(float)
        poly = leaf_polygon(rng, look, radius, angle, centre)
        cv2.fillPoly(img, [poly], colour.tolist(), lineType=cv2.LINE_AA)
        tip = poly[len(poly) // 4]
        cv2.line(img, tuple(int(v) for v in centre), (int(tip[0]), int(tip[1])), (colour * 0.75).tolist(), thickness)
    cv2.circle(img, tuple(int(v) for v in centre), max(2, int(side * 0.025)), look.centre, -1, lineType=cv2.LINE_AA)
    img += rng.normal(0, 5, img.shape).astype(np.float32)  # sensor noise over plant and soil
    blur = rng.uniform(0, 1.2) * side / 200
    if blur > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    return np.clip(img, 0, 255).astype(np.uint8)


def image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """Log-uniform sides like the real set (small seedlings, large plants); about one in three not square."""
    side = int(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
    if rng.random() < 0.35:
        return side, max(min_size // 2, int(side * rng.uniform(0.8, 1.2)))
    return side, side


def write_png(path: Path, rgb: np.ndarray, mode: str) -> None:
    """Save as RGB, RGBA (alpha 255) or greyscale PNG, as the real set mixes them."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if mode == "rgba":
        bgr = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    elif mode == "grey":
        bgr = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(path), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])


def make_demo(out: str | Path, per_class: int = 10, seed: int = 0, min_size: int = 50, max_size: int = 600) -> Path:
    """Write train/<Species>/*.png, test/*.png, sample_submission.csv (and answers.csv, the test labels) to out."""
    out = Path(out)
    if per_class < 1:
        raise UserError(f"--per-class: must be at least 1, got {per_class}")
    if out.exists():
        raise UserError(f"{out}: already exists (a competition folder is never rewritten; remove it first)")
    smallest = min(REAL_TRAIN_COUNTS.values())
    counts = {s: max(1, round(per_class * n / smallest)) for s, n in REAL_TRAIN_COUNTS.items()}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "test").mkdir(parents=True)

    def name(*key: object) -> str:
        return hashlib.sha256(repr((seed, *key)).encode()).hexdigest()[:9] + ".png"

    answers = []
    for label, species in enumerate(REAL_TRAIN_COUNTS):
        (tmp / "train" / species).mkdir(parents=True)
        n_test = max(1, round(counts[species] * TEST_FRACTION))
        for i in range(counts[species] + n_test):
            rng = np.random.default_rng([seed, label, i])
            w, h = image_size(rng, min_size, max_size)
            rgb = draw_plant(rng, LOOKS[species], w, h)
            mode = "rgba" if i % 11 == 3 else "grey" if i % 13 == 7 else "rgb"
            if i < counts[species]:
                write_png(tmp / "train" / species / name("train", species, i), rgb, mode)
            else:
                fname = name("test", species, i)
                write_png(tmp / "test" / fname, rgb, mode)
                answers.append((fname, species))
    answers.sort()
    (tmp / "sample_submission.csv").write_text("file,species\n" + "".join(f"{f},Sugar beet\n" for f, _ in answers))
    (tmp / "answers.csv").write_text("file,species\n" + "".join(f"{f},{s}\n" for f, s in answers))
    tmp.rename(out)
    return out
