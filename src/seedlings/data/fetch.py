"""The real competition: download with the kaggle API (or take a hand-downloaded bundle), extract safely, verify."""

from __future__ import annotations

import json
import math
import shutil
import stat
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from seedlings import paths
from seedlings.data.competition import REAL_TEST_IMAGES, REAL_TRAIN_COUNTS, check_competition, scan_competition
from seedlings.data.kaggle import KaggleClient, RealKaggle
from seedlings.defaults import COMPETITION
from seedlings.errors import UserError
from seedlings.storage import write_json

MAX_EXPAND = 20  # extracted bytes / archive bytes allowed by default; the real bundle (PNGs) expands about 1:1


@dataclass
class Budget:
    """Bytes extraction may still write: a zip bomb stops here instead of filling the disk."""

    left: int
    limit: int

    def spend(self, archive: Path, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise UserError(
                f"{archive}: expands past {self.limit:,} bytes (--max-expand times the archive; default "
                f"{MAX_EXPAND}): a zip bomb or the wrong file? A larger --max-expand allows more"
            )


def safe_extract(archive: Path, dest: Path, budget: Budget) -> None:
    """Extract a zip, refusing (before writing anything) absolute paths, `..` and links; member by member, so a
    damaged member is named and the budget holds whatever sizes the directory claims."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{archive}: not a readable zip ({e})") from None
    with zf:
        for info in zf.infolist():
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
                raise UserError(f"{archive}: member {info.filename!r} points outside the target; refusing to extract")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UserError(f"{archive}: member {info.filename!r} is a link; refusing to extract")
        for info in zf.infolist():
            target = dest / info.filename.replace("\\", "/")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        budget.spend(archive, len(chunk))
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise UserError(f"{archive}: member {info.filename!r} is damaged ({e}); download it again") from None


def expand_nested(folder: Path, budget: Budget) -> None:
    """The bundle has shipped train.zip, test.zip, sample_submission.csv.zip inside the outer zip: open them."""
    for inner in sorted(folder.rglob("*.zip")):
        safe_extract(inner, inner.parent, budget)
        inner.unlink()


def find_root(folder: Path) -> Path:
    """The folder in the extracted bundle that holds train/ (the bundle may wrap it in one more folder)."""
    candidates = sorted({p.parent for p in folder.rglob("train") if p.is_dir()}, key=lambda p: len(p.parts))
    if not candidates:
        raise UserError(f"{folder}: the bundle has no train/ folder")
    return candidates[0]


def write_manifest(root: Path, report, digests: dict[str, str], competition: str = COMPETITION) -> None:
    files = {name: {"bytes": (root / name).stat().st_size, "sha256": d} for name, d in sorted(digests.items())}
    manifest = {
        "competition": competition,
        "counts": {"train": sum(report.counts.values()), "test": report.n_test},
        "species": report.counts,
        "files": files,
    }
    write_json(root / "MANIFEST.json", manifest)


def is_verified(data: Path) -> bool:
    """A folder whose MANIFEST.json lists exactly the files present, with their sizes."""
    m = data / "MANIFEST.json"
    if not m.is_file():
        return False
    try:
        files = json.loads(m.read_text())["files"]
    except (ValueError, KeyError):
        return False
    present = {str(p.relative_to(data)) for sub in ("train", "test") for p in (data / sub).rglob("*") if p.is_file()}
    present.add("sample_submission.csv")
    if present != set(files):
        return False
    return all((data / n).stat().st_size == f["bytes"] for n, f in files.items())


def fetch(
    data: str | Path,
    archive: str | Path | None = None,
    client: KaggleClient | None = None,
    max_expand: float = MAX_EXPAND,
    competition: str = COMPETITION,
) -> Path:
    """Make `data` a verified competition folder: download (or take `archive`), extract, check, write MANIFEST.json.
    Nothing is left behind by a failure: the folder appears under its name complete or not at all."""
    data = Path(data)
    if not (math.isfinite(max_expand) and 0 < max_expand <= 1e6):
        raise UserError(f"--max-expand: extracted bytes per archive byte, a number in (0, 1e6], got {max_expand}")
    if data.exists():
        if archive is not None:
            print(f"note: {data} exists, so {archive} was not unpacked; delete {data} to unpack it", file=sys.stderr)
        if is_verified(data):
            print(f"{data}: file list and sizes match MANIFEST.json (hashes not re-read), nothing to do")
            return data
        scan_competition(data)  # a folder unpacked by hand: use it as it is, never write into it
        print(f"{data}: exists without a matching MANIFEST.json; using it as it is (check it with `make check-data`)")
        return data
    source = download(client or RealKaggle(competition)) if archive is None else Path(archive)
    if not source.exists():
        raise UserError(f"{source}: archive not found")
    packed = sum(z.stat().st_size for z in source.glob("*.zip")) if source.is_dir() else source.stat().st_size
    limit = int(max(packed, 1 << 20) * max_expand)  # at least 1 MiB x the factor: tiny test bundles still unpack
    budget = Budget(limit, limit)
    tmp = data.with_name(data.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    made = [p for p in reversed(data.resolve().parents) if not p.exists()]  # folders this call creates
    try:
        unpack_bundle(source, data.with_name(data.name + ".unpack"), tmp, budget)
        report, digests = check_competition(tmp, with_digests=True)
        write_manifest(tmp, report, digests, competition)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):  # deepest first; only if still empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    n_train, real_train = sum(report.counts.values()), sum(REAL_TRAIN_COUNTS.values())
    if (n_train, report.n_test) != (real_train, REAL_TEST_IMAGES):
        print(f"warning: {n_train} train and {report.n_test} test images; the competition has {real_train} and "
              f"{REAL_TEST_IMAGES}", file=sys.stderr)  # fmt: skip
    tmp.rename(data)  # only a complete, verified folder gets the real name
    print(f"{data}: {n_train} train, {report.n_test} test images in {len(report.counts)} species; verified")
    return data


def download(client: KaggleClient) -> Path:
    """The competition's files from Kaggle into data/raw/: the bundle's zip, or the folder it was unpacked into."""
    raw = paths.raw_dir()
    client.download(raw)
    zips = sorted(raw.glob("*.zip"))
    if not zips and not (raw / "train").is_dir():
        raise UserError(f"{raw}: the download left no zip and no train/ folder")
    return zips[0] if zips else raw


def unpack_bundle(source: Path, unpack: Path, out: Path, budget: Budget) -> None:
    """Extract a bundle (a zip, or a folder of zips and files) and move its competition folder to `out`."""
    shutil.rmtree(unpack, ignore_errors=True)
    unpack.mkdir(parents=True)
    try:
        if source.is_dir():
            shutil.copytree(source, unpack / "bundle", ignore=shutil.ignore_patterns("*.zip"))
            for z in source.glob("*.zip"):
                safe_extract(z, unpack / "bundle", budget)
        else:
            safe_extract(source, unpack, budget)
        expand_nested(unpack, budget)
        find_root(unpack).rename(out)
    finally:
        shutil.rmtree(unpack, ignore_errors=True)
