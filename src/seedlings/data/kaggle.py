"""The boundary with Kaggle: credentials, the kaggle package's API behind a small client (tests hand in a fake),
uploading a submission, listing your submissions with their scores, and pushing a notebook bundle and fetching what
it wrote (seedlings.bundle)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

from seedlings import paths
from seedlings.defaults import COMPETITION
from seedlings.errors import UserError

KAGGLE_TIMEOUT_S = 120  # seconds a Kaggle call may wait on a silent network before it fails


def kaggle_timeout() -> float:
    """KAGGLE_TIMEOUT_S, or $SEEDLINGS_KAGGLE_TIMEOUT (seconds) where set."""
    try:
        return max(1.0, float(os.environ.get("SEEDLINGS_KAGGLE_TIMEOUT", KAGGLE_TIMEOUT_S)))
    except ValueError:
        return KAGGLE_TIMEOUT_S


class KaggleClient(Protocol):
    """The boundary with Kaggle; tests hand in a fake."""

    def download(self, dest: Path) -> None: ...

    def submit(self, csv: Path, message: str) -> None: ...

    def submissions(self) -> list[dict]: ...

    # a notebook bundle (make kaggle-push, make kaggle-output): the wheel dataset and the notebook
    def username(self) -> str: ...

    def dataset_status(self, dataset: str) -> str | None: ...  # None: no such dataset yet

    def dataset_push(self, folder: Path, new: bool, notes: str) -> None: ...

    def kernel_push(self, folder: Path) -> str: ...  # the notebook's URL

    def kernel_status(self, kernel: str) -> str: ...  # complete | running | queued | error | cancelAcknowledged ...

    def kernel_output(self, kernel: str, dest: Path) -> None: ...


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
            if name == "kaggle.json":
                check_kaggle_json(f)
            return str(f)
    raise UserError(
        f"no Kaggle credentials: put kaggle.json (Account > API > Create New Token) in {_config_dir()}/ "
        "(chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN; KAGGLE_CONFIG_DIR moves the folder"
    )


def check_kaggle_json(path: Path) -> None:
    """The kaggle package ignores a kaggle.json it cannot read and then reports no credentials at all: name it."""
    try:
        token = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        token = None
    if not (isinstance(token, dict) and token.get("username") and token.get("key")):
        raise UserError(f'{path}: not a usable Kaggle token (expected {{"username": ..., "key": ...}}); create a new '
                        "one (Account > API > Create New Token) and replace it")  # fmt: skip


def explain_kaggle_error(e: BaseException, competition: str = COMPETITION) -> UserError:
    """One line for what went wrong at the Kaggle boundary; never echoes the key."""
    status = getattr(e, "status", None) or getattr(getattr(e, "response", None), "status_code", None)
    text = str(e)
    if status in (401,) or "401" in text[:80]:
        return UserError("Kaggle refused the credentials (401): create a new API token and replace the old one")
    if status == 403 or "403" in text[:80]:
        rules = f"https://www.kaggle.com/competitions/{competition}/rules"
        return UserError(f"Kaggle answered 403: accept the competition rules first at {rules}")
    if status == 404 or "404" in text[:80]:
        return UserError(f"Kaggle answered 404: competition {competition!r} not found")
    network = (ConnectionError, TimeoutError, OSError)
    if isinstance(e, network) or "connection" in text.lower() or "resolve" in text.lower():
        return UserError(f"cannot reach Kaggle (network failure: {type(e).__name__}); check the connection and retry")
    return UserError(f"Kaggle call failed: {type(e).__name__}: {text.splitlines()[0] if text else ''}")


class RealKaggle:
    """The kaggle package's API for one competition, authenticated on first use."""

    competition = COMPETITION

    def __init__(self, competition: str = COMPETITION) -> None:
        self.competition = competition
        source = credentials_source()
        # the package prints its own warning about a loose kaggle.json, at import and again at authentication (ours
        # was printed once already): kept out
        with contextlib.redirect_stdout(io.StringIO()) as said:
            try:
                from kaggle.api.kaggle_api_extended import KaggleApi

                self.api = KaggleApi()
                self._call(self.api.authenticate)
            except SystemExit:  # the package authenticates when imported, and exits when it cannot
                raise UserError(f"the kaggle package found no usable credentials in {source}") from None
            except UserError as e:
                if "stopped" in str(e):
                    raise UserError(f"the kaggle package found no usable credentials in {source}") from None
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes one line
                raise explain_kaggle_error(e, competition) from None
        for line in said.getvalue().splitlines():
            if "readable by other users" not in line:
                print(line)

    def _call(self, fn, *args, progress: Path | None = None, **kwargs):
        """One call of the kaggle API, every failure as one line. Its HTTP layer passes no timeout of its own, so a
        proxy or network that accepts and stays silent would hang it forever: the call runs in a thread that is given
        kaggle_timeout() seconds, or with `progress` (a download's folder) that long without a byte arriving."""
        result: dict = {}

        def run() -> None:
            try:
                result["value"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                result["error"] = e

        worker = threading.Thread(target=run, name="kaggle-call", daemon=True)  # daemon: a hung call ends with us
        worker.start()
        limit, size, quiet_since = kaggle_timeout(), -1, time.monotonic()
        while worker.is_alive():
            worker.join(0.2)
            now = folder_bytes(progress) if progress is not None else size
            if now != size:
                size, quiet_since = now, time.monotonic()
            if time.monotonic() - quiet_since > limit:
                raise UserError(f"Kaggle did not answer within {limit:.0f} s (network, firewall or HTTPS_PROXY silent);"
                                " check the connection and retry")  # fmt: skip
        error = result.get("error")
        if isinstance(error, SystemExit):
            raise UserError("the kaggle package stopped (see its message above)")
        if error is not None:
            raise explain_kaggle_error(error, self.competition)
        return result.get("value")

    def download(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self._call(self.api.competition_download_files, self.competition, path=str(dest), quiet=False, progress=dest)

    def submit(self, csv: Path, message: str) -> None:
        self._call(self.api.competition_submit, str(csv), message, self.competition)

    def submissions(self) -> list[dict]:
        subs = self._call(self.api.competition_submissions, self.competition) or []
        return [submission_row(s) for s in subs if s is not None]

    def username(self) -> str:
        return self.api.get_config_value("username") or ""

    def dataset_status(self, dataset: str) -> str | None:
        try:
            return str(self._call(self.api.dataset_status, dataset)).lower()
        except UserError as e:
            if "404" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def dataset_push(self, folder: Path, new: bool, notes: str) -> None:
        if new:  # private; a folder inside would be uploaded as one zip (make kaggle writes none)
            self._call(self.api.dataset_create_new, str(folder), public=False, quiet=True, dir_mode="zip")
        else:
            self._call(self.api.dataset_create_version, str(folder), notes, quiet=True, dir_mode="zip")

    def kernel_push(self, folder: Path) -> str:
        answer = self._call(self.api.kernels_push, str(folder))
        error = getattr(answer, "error", None)
        if error:
            raise UserError(f"Kaggle refused the notebook: {error}")
        return str(getattr(answer, "url", "") or "")

    def kernel_status(self, kernel: str) -> str:
        answer = self._call(self.api.kernels_status, kernel)
        status = getattr(answer, "status", answer)
        return str(getattr(status, "name", status)).lower()

    def kernel_output(self, kernel: str, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self._call(self.api.kernels_output, kernel, str(dest), force=True, quiet=True, progress=dest)


def kaggle_username() -> str | None:
    """The account's name from the environment or kaggle.json, without contacting Kaggle (None: not found)."""
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    try:
        return json.loads((_config_dir() / "kaggle.json").read_text(encoding="utf-8")).get("username") or None
    except (OSError, ValueError, AttributeError):
        return None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


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


def upload_message(run: str) -> str:
    prov = paths.submission_path(run).with_suffix(".json")
    if not prov.exists():
        raise UserError(f"{prov}: no provenance for run {run!r} (make submit RUN={run} first)")
    p = json.loads(prov.read_text())
    oof = p["members"]["blend"]["micro_f1"]
    return f"{run}: OOF micro-F1 {oof:.4f}, {len(p['members']) - 1} members, commit {p['git_commit'][:10]}"


def upload(
    run: str, message: str | None = None, client: KaggleClient | None = None, competition: str = COMPETITION
) -> None:
    csv = paths.submission_path(run)
    if not csv.exists():
        raise UserError(f"{csv}: not found (make submit RUN={run} first)")
    message = message or upload_message(run)
    (client or RealKaggle(competition)).submit(csv, message)
    print(f"uploaded {csv}: {message}")


def leaderboard(client: KaggleClient | None = None, competition: str = COMPETITION) -> list[dict]:
    """Your submissions to the competition, newest first, with their public and private scores."""
    rows = (client or RealKaggle(competition)).submissions()
    if not rows:
        print("no submissions yet")
    for row in rows:
        print(
            f"{str(row['date'])[:19]:19}  {str(row['status']):10}  public {str(row['public_score']):8}  "
            f"private {str(row['private_score']):8}  {row['description']}"
        )
    return rows
