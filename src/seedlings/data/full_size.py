"""A full-size stand-in for the real competition, generated, never downloaded: Kaggle's counts (4,750 labelled photos
in 12 species folders with the real class counts, 794 test photos, `sample_submission.csv`) at a spread of sizes like
the real photos' (49 px to about 2,800 px a side, most of them a few hundred), as PNGs that compress like photographs.

A photo is a real one upsampled with sensor noise where a folder of real photos is given (`--source`, the shared
150 px photos: species by species, each reused at other sizes and turns), a drawn plant otherwise. Test photos are
drawn from the same species as training ones, so `answers.csv` holds their labels. What it is for is what the real
photos cost (decoding, the plant mask, the caches, the first `make submit`); its accuracy says nothing. Seeded: the
same arguments write the same bytes."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np

from seedlings.data.competition import REAL_TEST_IMAGES, REAL_TRAIN_COUNTS, parallel_imap, read_image
from seedlings.data.demo import LOOKS, draw_plant, write_png
from seedlings.errors import UserError

MIN_SIDE, MAX_SIDE = 49, 2800  # px: the smallest and largest sides public write-ups give for Kaggle's photos
MEDIAN_SIDE, SPREAD = 250, 0.6  # log-normal sides: median 250 px, one in a hundred above about 1,000 px
NOISE = 4.0  # grey levels (std) of sensor noise over an upsampled photo: it compresses as a photograph then


def photo_sizes(rng: np.random.Generator, max_side: int) -> tuple[int, int]:
    """(width, height): log-normal around MEDIAN_SIDE, within [MIN_SIDE, max_side]; about one in three not square."""
    side = int(np.clip(np.exp(rng.normal(np.log(MEDIAN_SIDE), SPREAD)), MIN_SIDE, max_side))
    if rng.random() < 0.35:
        return side, int(np.clip(side * rng.uniform(0.75, 1.0), MIN_SIDE, max_side))
    return side, side


def split_counts(fraction: float) -> dict[str, tuple[int, int]]:
    """species -> (training photos, test photos): the real counts times `fraction` (at least one of each), the test
    photos shared out by the largest remainders so that they total the real ratio (794 of 4,750 at fraction 1)."""
    train = {s: max(1, round(n * fraction)) for s, n in REAL_TRAIN_COUNTS.items()}
    share = {s: n * REAL_TEST_IMAGES / sum(REAL_TRAIN_COUNTS.values()) for s, n in train.items()}
    test = {s: int(v) for s, v in share.items()}
    left = max(len(train), round(sum(share.values()))) - sum(test.values())
    for s in sorted(share, key=lambda s: share[s] - test[s], reverse=True)[:left]:
        test[s] += 1
    return {s: (train[s], test[s]) for s in train}


def write_photo(job: tuple) -> int:
    """One photo (a pool's job: module-level, its arguments plain): the source photo turned and upsampled with noise,
    or a drawn plant; returns the bytes written."""
    path, source, species, key, size, turn = job
    rng = np.random.default_rng(key)
    if source is None:
        rgb = draw_plant(rng, LOOKS[species], *size)
    else:
        img = np.rot90(read_image(source), turn % 4)
        img = cv2.resize(img[:, ::-1] if turn >= 4 else img, size, interpolation=cv2.INTER_CUBIC)
        noisy = img.astype(np.float32) + rng.standard_normal(img.shape, dtype=np.float32) * NOISE
        rgb = np.clip(noisy, 0, 255).round().astype(np.uint8)
    write_png(Path(path), rgb, "rgb")
    return Path(path).stat().st_size


def source_photos(source: Path | None) -> dict[str, list[Path]]:
    """species -> its real photos under source/train (sorted); empty without a source."""
    if source is None:
        return {}
    found = {s: sorted((source / "train" / s).glob("*.png")) for s in REAL_TRAIN_COUNTS}
    missing = [s for s, files in found.items() if not files]
    if missing:
        raise UserError(f"--source: {source}/train has no PNG photos of {', '.join(missing)}")
    return found


def make_full_size(out: str | Path, fraction: float = 1.0, seed: int = 0, max_side: int = MAX_SIDE,
                   source: str | Path | None = None) -> Path:  # fmt: skip
    """Write train/<Species>/*.png, test/*.png, sample_submission.csv and answers.csv to `out`, every core drawing."""
    out, source = Path(out), Path(source) if source else None
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction: the share of Kaggle's counts, in (0, 1], got {fraction}")
    if not MIN_SIDE <= max_side:
        raise UserError(f"--max-size: at least {MIN_SIDE} px, got {max_side}")
    if out.exists():
        raise UserError(f"{out}: already exists (a competition folder is never rewritten; remove it first)")
    sources = source_photos(source)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "test").mkdir(parents=True)
    jobs, answers = [], []
    for label, (species, (n_train, n_test)) in enumerate(split_counts(fraction).items()):
        (tmp / "train" / species).mkdir(parents=True)
        for i in range(n_train + n_test):
            key = [seed, label, i]
            name = hashlib.sha256(repr(key).encode()).hexdigest()[:10] + ".png"
            size = photo_sizes(np.random.default_rng([*key, 1]), max_side)
            if i == 0:  # each species has one photo at the largest side: the extremes are there at any fraction
                size = (max_side, round(max_side * 0.76))
            path = tmp / "train" / species / name if i < n_train else tmp / "test" / name
            own = sources.get(species, [])
            picked = str(own[i % len(own)]) if own else None
            jobs.append((str(path), picked, species, key, size, (i // max(1, len(own))) % 8))
            if i >= n_train:
                answers.append((name, species))
    written = sum(parallel_imap(write_photo, jobs, desc="full-size stand-in"))
    answers.sort()
    (tmp / "sample_submission.csv").write_text("file,species\n" + "".join(f"{f},Sugar beet\n" for f, _ in answers))
    (tmp / "answers.csv").write_text("file,species\n" + "".join(f"{f},{s}\n" for f, s in answers))
    tmp.rename(out)
    print(f"{out}: {len(jobs) - len(answers)} training and {len(answers)} test photos, {written / 1e9:.2f} GB")
    return out
