"""The real competition: download with the kaggle API (or take a hand-downloaded bundle), extract safely, verify."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from seedlings import paths
from seedlings.errors import UserError
from seedlings.files import write_json
from seedlings.images import check_competition, scan_competition

COMPETITION = "plant-seedlings-classification"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
REAL_COUNTS = {"train": 4750, "test": 794}


class KaggleClient(Protocol):
    """The boundary with Kaggle; tests hand in a fake."""

    def download(self, dest: Path) -> None: ...

    def submit(self, csv: Path, message: str) -> None: ...

    def submissions(self) -> list[dict]: ...


WARNED: set[str] = set()  # credential files already warned about


def _config_dir() -> Path:
    return Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))


def credentials_source() -> str:
    """Where the kaggle API will find credentials; exit 2 with where to put them when there are none."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    for name in ("access_token", "kaggle.json", "credentials.json"):
        f = _config_dir() / name
        if f.is_file():
            if f.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO) and str(f) not in WARNED:
                WARNED.add(str(f))  # once per process, however many calls look for credentials
                print(f"warning: {f} is readable by other users; run: chmod 600 {f}", file=sys.stderr)
            return str(f)
    raise UserError(
        f"no Kaggle credentials: put kaggle.json (Account > API > Create New Token) in {_config_dir()}/ "
        "(chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN; KAGGLE_CONFIG_DIR moves the folder"
    )


def explain_kaggle_error(e: BaseException) -> UserError:
    """One line for what went wrong at the Kaggle boundary; never echoes the key."""
    status = getattr(e, "status", None) or getattr(getattr(e, "response", None), "status_code", None)
    text = str(e)
    if status in (401,) or "401" in text[:80]:
        return UserError("Kaggle refused the credentials (401): create a new API token and replace the old one")
    if status == 403 or "403" in text[:80]:
        return UserError(f"Kaggle answered 403: accept the competition rules first at {RULES_URL}")
    if status == 404 or "404" in text[:80]:
        return UserError(f"Kaggle answered 404: competition {COMPETITION!r} not found")
    network = (ConnectionError, TimeoutError, OSError)
    if isinstance(e, network) or "connection" in text.lower() or "resolve" in text.lower():
        return UserError(f"cannot reach Kaggle (network failure: {type(e).__name__}); check the connection and retry")
    return UserError(f"Kaggle call failed: {type(e).__name__}: {text.splitlines()[0] if text else ''}")


class RealKaggle:
    """The kaggle package's API, authenticated on first use."""

    def __init__(self) -> None:
        credentials_source()
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi

            self.api = KaggleApi()
            self.api.authenticate()
        except SystemExit:
            raise UserError("the kaggle package found no usable credentials (see `kaggle auth login`)") from None
        except Exception as e:  # noqa: BLE001 - every failure becomes one line
            raise explain_kaggle_error(e) from None

    def _call(self, fn, *args, **kwargs):
        """One call of the kaggle API with a socket timeout (its HTTP client sets none: a network that drops packets
        would hang forever) and every failure as one line."""
        import socket

        before = socket.getdefaulttimeout()
        socket.setdefaulttimeout(KAGGLE_TIMEOUT_S)
        try:
            return fn(*args, **kwargs)
        except SystemExit:
            raise UserError("the kaggle package stopped (see its message above)") from None
        except Exception as e:  # noqa: BLE001
            raise explain_kaggle_error(e) from None
        finally:
            socket.setdefaulttimeout(before)

    def download(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self._call(self.api.competition_download_files, COMPETITION, path=str(dest), quiet=False)

    def submit(self, csv: Path, message: str) -> None:
        self._call(self.api.competition_submit, str(csv), message, COMPETITION)

    def submissions(self) -> list[dict]:
        subs = self._call(self.api.competition_submissions, COMPETITION) or []
        return [submission_row(s) for s in subs if s is not None]


def submission_row(sub) -> dict:
    """One of the kaggle package's ApiSubmission objects as the row `make leaderboard` prints: the status enum by
    name (complete, pending, error), scores as Kaggle gives them (strings; empty until scored)."""
    status = getattr(sub, "status", "")
    return {
        "date": getattr(sub, "date", ""),
        "description": getattr(sub, "description", "") or "",
        "status": getattr(status, "name", str(status)).lower(),
        "public_score": getattr(sub, "public_score", "") or "",
        "private_score": getattr(sub, "private_score", "") or "",
    }


MAX_EXPAND = 20  # extracted bytes / archive bytes allowed by default; the real bundle (PNGs) expands about 1:1
KAGGLE_TIMEOUT_S = 120  # seconds a Kaggle call may wait on a silent network before it fails


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


def write_manifest(root: Path, report, digests: dict[str, str]) -> None:
    files = {name: {"bytes": (root / name).stat().st_size, "sha256": d} for name, d in sorted(digests.items())}
    manifest = {
        "competition": COMPETITION,
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
) -> Path:
    """Make `data` a verified competition folder: download (or take `archive`), extract, check, write MANIFEST.json.
    Nothing is left behind by a failure: the folder appears under its name complete or not at all."""
    data = Path(data)
    if data.exists():
        if archive is not None:
            print(f"note: {data} exists, so {archive} was not unpacked; delete {data} to unpack it", file=sys.stderr)
        if is_verified(data):
            print(f"{data}: file list and sizes match MANIFEST.json (hashes not re-read), nothing to do")
            return data
        scan_competition(data)  # a folder unpacked by hand: use it as it is, never write into it
        print(f"{data}: exists without a matching MANIFEST.json; using it as it is (check it with `make check-data`)")
        return data
    source = download(client) if archive is None else Path(archive)
    if not source.exists():
        raise UserError(f"{source}: archive not found")
    packed = sum(z.stat().st_size for z in source.glob("*.zip")) if source.is_dir() else source.stat().st_size
    limit = int(max(packed, 1 << 20) * max_expand)  # at least 1 MiB x the factor: tiny test bundles still unpack
    budget = Budget(limit, limit)
    tmp = data.with_name(data.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unpack_bundle(source, data.with_name(data.name + ".unpack"), tmp, budget)
        report, digests = check_competition(tmp, with_digests=True)
        write_manifest(tmp, report, digests)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_train = sum(report.counts.values())
    if (n_train, report.n_test) != (REAL_COUNTS["train"], REAL_COUNTS["test"]):
        print(
            f"warning: {n_train} train and {report.n_test} test images; the competition has "
            f"{REAL_COUNTS['train']} and {REAL_COUNTS['test']}",
            file=sys.stderr,
        )
    tmp.rename(data)  # only a complete, verified folder gets the real name
    print(f"{data}: {n_train} train, {report.n_test} test images in {len(report.counts)} species; verified")
    return data


def download(client: KaggleClient | None) -> Path:
    """The competition's files from Kaggle into data/raw/: the bundle's zip, or the folder it was unpacked into."""
    raw = paths.raw_dir()
    (client or RealKaggle()).download(raw)
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
