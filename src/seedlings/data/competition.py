"""One image reader for every file, and the scan of a competition folder (train/<Species>/*, test/*)."""

from __future__ import annotations

import functools
import hashlib
import multiprocessing as mp
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from seedlings.errors import UserError
from seedlings.progress import bar
from seedlings.storage import file_sha256


@functools.cache
def opencv():
    """OpenCV, imported on the first image decoded (listing runs and reading folds need none), its own warnings off:
    unreadable files are reported once, by us, naming the file."""
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


STRAY_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
# Larger images are refused before decoding (a 1.8 kB PNG may claim 60,000 x 60,000): the competition's largest photo
# is about 3,650 px a side (13 million pixels)
MAX_PIXELS = 100_000_000

# The real competition: training images per species (4,750 in all; the demo keeps these ratios) and test images.
REAL_TRAIN_COUNTS = {
    "Black-grass": 263, "Charlock": 390, "Cleavers": 287, "Common Chickweed": 611, "Common wheat": 221,
    "Fat Hen": 475, "Loose Silky-bent": 654, "Maize": 221, "Scentless Mayweed": 516, "Shepherds Purse": 231,
    "Small-flowered Cranesbill": 496, "Sugar beet": 385,
}  # fmt: skip
REAL_TEST_IMAGES = 794


def check_header(path: Path) -> None:
    """Refuse, without decoding it, an image whose header claims more than MAX_PIXELS (read by PIL; a format PIL
    cannot read is left to OpenCV)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides, not PIL's bound
            with Image.open(path) as im:
                pixels = im.size[0] * im.size[1]
    except Image.DecompressionBombError as e:  # over twice PIL's own bound: its message gives the claim
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else MAX_PIXELS + 1
    except (OSError, ValueError, SyntaxError):  # not a format PIL reads, or damaged: OpenCV decides
        return
    if pixels > MAX_PIXELS:
        raise UserError(f"{path}: its header claims {pixels:,} pixels, more than {MAX_PIXELS:,}; not decoded")


def read_image(path: str | Path) -> np.ndarray:
    """Decode PNG or JPEG to RGB uint8 (H, W, 3): alpha dropped, greyscale and palette expanded, 16 bit scaled.

    Raises UserError naming the file when it is empty or not a decodable image.
    """
    path = Path(path)
    try:
        buf = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode: non-ASCII paths work too
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if buf.size == 0:
        raise UserError(f"{path}: empty file (0 bytes)")
    check_header(path)
    cv2 = opencv()
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)  # keeps 16-bit depth so we can scale it ourselves
    except cv2.error as e:  # a header OpenCV refuses (a size past its own bound, a damaged chunk)
        raise UserError(f"{path}: not a readable image (OpenCV: {str(e).strip().splitlines()[-1]})") from None
    if img is None:
        raise UserError(f"{path}: not a readable image")
    if img.dtype == np.uint16:
        img = (img.astype(np.uint32) * 255 + 32767) // 65535  # exact rounding of v * 255 / 65535
    img = img.astype(np.uint8, copy=False)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _listed(p: Path) -> bool:
    """Every file counts except stray OS files and hidden ones: a non-image file is an error check-data reports."""
    return p.is_file() and p.name not in STRAY_FILES and not p.name.startswith(".")


@dataclass(frozen=True)
class Competition:
    """The files of a competition folder; `train_files` are relative to train/, `test_files` to test/."""

    root: Path
    classes: list[str]  # species, sorted: the class index order everywhere
    train_files: list[str]  # "<Species>/<name>.png"
    train_labels: list[int]
    test_files: list[str]  # "<name>.png"
    ignored: tuple[str, ...] = ()  # subfolders inside species folders or test/, links to nothing: not read

    def train_path(self, rel: str) -> Path:
        return self.root / "train" / rel

    def test_path(self, rel: str) -> Path:
        return self.root / "test" / rel

    def split(self, name: str) -> tuple[list[str], Path]:
        """The files of split `name` (train or test) and the folder they are relative to."""
        if name not in ("train", "test"):
            raise ValueError(f"no split {name!r}: train or test")
        return (self.train_files if name == "train" else self.test_files), self.root / name


def list_folder(folder: Path) -> tuple[list[str], list[str]]:
    """(file names, subfolder notes) of one folder: files sorted, each subfolder as `path/ (N files)`."""
    files, subfolders = [], []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not p.exists():
            subfolders.append(f"{p} (a link to nothing: {os.readlink(p)})")
        elif p.is_dir() and not p.name.startswith("."):
            subfolders.append(f"{p}/ ({sum(1 for q in p.rglob('*') if _listed(q))} files)")
        elif _listed(p):
            files.append(p.name)
    return files, subfolders


def scan_competition(root: str | Path, need_test: bool = True) -> Competition:
    """List a competition folder; a missing train/ (or test/, sample_submission.csv), an empty species folder, a test
    set one folder down or a sample submission that does not list test/ exits 2 naming it."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: competition folder not found (make data, or make demo-data and DATA=data/demo)")
    train = root / "train"
    if not train.is_dir():
        raise UserError(f"{train}: missing (a competition folder holds train/<Species>/*.png)")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"{train}: {len(classes)} species folders; a classifier needs at least 2")
    files, labels, ignored = [], [], []
    for label, species in enumerate(classes):
        names, subfolders = list_folder(train / species)
        if not names:
            raise UserError(f"{train / species}: empty species folder (no images); remove it or add its images")
        files += [f"{species}/{n}" for n in names]
        labels += [label] * len(names)
        ignored += subfolders
    test_files: list[str] = []
    if need_test:
        test_files, subfolders = list_test(root)
        ignored += subfolders
        check_sample_lists_test(root, test_files)
    return Competition(root, classes, files, labels, test_files, tuple(ignored))


def list_test(root: Path) -> tuple[list[str], list[str]]:
    test = root / "test"
    if not test.is_dir():
        raise UserError(f"{test}: missing (a competition folder holds test/*.png)")
    files, subfolders = list_folder(test)
    if not files:
        where = f"; {subfolders[0]} holds them one folder down: move them up into test/" if subfolders else ""
        raise UserError(f"{test}: no test images{where}")
    return files, subfolders


def read_sample(root: str | Path) -> list[str]:
    """The test files sample_submission.csv lists, in its order (Kaggle grades rows by `file`)."""
    path = Path(root) / "sample_submission.csv"
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        sample = pd.read_csv(path, dtype=str, encoding="utf-8-sig", keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({type(e).__name__})") from None
    if "file" not in sample.columns:
        columns = ",".join(map(str, sample.columns))
        raise UserError(f"{path}: no 'file' column (columns: {columns}); Kaggle's sample has file,species")
    dup = sample.file[sample.file.duplicated()]
    if len(dup):
        raise UserError(f"{path}: {len(dup)} files listed twice, e.g. {dup.iloc[0]}")
    return sample.file.tolist()


def check_sample_lists_test(root: Path, test_files: list[str]) -> None:
    """sample_submission.csv and test/ must name the same images: found in seconds, not after training."""
    listed, present = read_sample(root), set(test_files)
    missing = [f for f in listed if f not in present]
    extra = sorted(present - set(listed))
    if missing:
        raise UserError(
            f"{root / 'sample_submission.csv'}: {len(missing)} listed files are not in test/, e.g. {missing[0]}"
        )
    if extra:
        raise UserError(f"{root / 'test'}: {len(extra)} images not listed in sample_submission.csv, e.g. {extra[0]}")


def listing_hash(paths: list[Path], names: list[str], with_mtime: bool) -> str:
    """A short key for a set of files: names and sizes (and modification times when asked), not their bytes."""
    h = hashlib.sha256()
    for p, name in zip(paths, names):
        st = p.stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns if with_mtime else 0}\n".encode())
    return h.hexdigest()[:10]


def parallel_imap(fn, items: list, desc: str, workers: int | None = None):
    """Yield fn(item) in order, computed on every core, with a progress bar; fn must be a module-level function."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(items) < 64:  # a pool costs more than it saves on a handful of files
        yield from (fn(x) for x in bar(items, desc=desc, unit="image", disable=len(items) < 64))
        return
    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    with ctx.Pool(workers) as pool:
        yield from bar(pool.imap(fn, items, chunksize=8), total=len(items), desc=desc, unit="image")


def parallel_map(fn, items: list, desc: str, workers: int | None = None) -> list:
    return list(parallel_imap(fn, items, desc, workers))


def _inspect(path: Path) -> tuple[str, int, int, str | None]:
    """(sha256, width, height, error) of one file; error is the message naming the file, or None."""
    digest = file_sha256(path)
    try:
        img = read_image(path)
    except UserError as e:
        return digest, 0, 0, str(e)
    return digest, img.shape[1], img.shape[0], None


@dataclass
class DataReport:
    counts: dict[str, int]  # training images per species
    n_test: int
    widths: list[int]
    heights: list[int]
    duplicates: list[list[str]]  # groups of byte-identical files ("train/<Species>/x.png", "test/y.png")
    bad: list[str]  # error messages, one per unreadable file
    ignored: tuple[str, ...] = ()  # subfolders that are not part of the competition

    def lines(self) -> list[str]:
        out = [f"train: {sum(self.counts.values())} images in {len(self.counts)} species; test: {self.n_test} images"]
        width = max(len(c) for c in self.counts)
        out += [f"  {c:<{width}}  {n:5d}" for c, n in self.counts.items()]
        if self.widths:
            w, h = np.array(self.widths), np.array(self.heights)
            out.append(
                f"sizes (px): width min {w.min()} median {int(np.median(w))} max {w.max()}; "
                f"height min {h.min()} median {int(np.median(h))} max {h.max()}; "
                f"{int((w != h).sum())} not square"
            )
        out.append(f"byte-identical duplicate groups: {len(self.duplicates)}")
        out += ["  " + " = ".join(g) for g in self.duplicates[:20]]
        if self.bad:
            out.append(f"skipped {len(self.bad)} unreadable files:")
            out += ["  " + b for b in self.bad]
        conflicts = [g for g in self.duplicates if len({n.split("/")[1] for n in g if n.startswith("train/")}) > 1]
        if conflicts:
            out.append(f"conflicting labels: {len(conflicts)} groups of identical images under different species:")
            out += ["  " + " = ".join(g) for g in conflicts[:20]]
        if self.ignored:
            out.append(f"ignored {len(self.ignored)} entries (species folders and test/ hold image files directly):")
            out += ["  " + s for s in self.ignored]
        return out


def check_competition(root: str | Path, skip_bad_images: bool = False, with_digests: bool = False):
    """Decode every image of a competition folder; the first bad file exits 2 unless skip_bad_images.

    Returns the DataReport, and with `with_digests` also {relative name: sha256}.
    """
    comp = scan_competition(root)
    names = [f"train/{f}" for f in comp.train_files] + [f"test/{f}" for f in comp.test_files]
    results = parallel_map(_inspect, [comp.root / n for n in names], desc="decode")
    bad = [err for *_, err in results if err]
    if bad and not skip_bad_images:
        raise UserError(bad[0] + (f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""))
    by_digest: dict[str, list[str]] = {}
    for name, (digest, *_rest) in zip(names, results):
        by_digest.setdefault(digest, []).append(name)
    counts = {c: 0 for c in comp.classes}
    for label in comp.train_labels:
        counts[comp.classes[label]] += 1
    ok = [(width, height) for _, width, height, error in results if error is None]
    report = DataReport(
        counts,
        len(comp.test_files),
        [width for width, _ in ok],
        [height for _, height in ok],
        [g for g in by_digest.values() if len(g) > 1],
        bad,
        comp.ignored,
    )
    if with_digests:
        digests = {name: digest for name, (digest, *_rest) in zip(names, results)}
        digests["sample_submission.csv"] = file_sha256(comp.root / "sample_submission.csv")
        return report, digests
    return report
