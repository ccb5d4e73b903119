"""The boundary with Kaggle: credentials, the kaggle package's API behind a small client (tests hand in a fake),
uploading a submission and listing your submissions with their scores."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Protocol

from seedlings import paths
from seedlings.errors import UserError

COMPETITION = "plant-seedlings-classification"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
KAGGLE_TIMEOUT_S = 120  # seconds a Kaggle call may wait on a silent network before it fails


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


def upload_message(run: str) -> str:
    prov = paths.submissions_dir() / f"{run}.json"
    if not prov.exists():
        raise UserError(f"{prov}: no provenance for run {run!r} (make submit RUN={run} first)")
    p = json.loads(prov.read_text())
    oof = p["members"]["blend"]["micro_f1"]
    return f"{run}: OOF micro-F1 {oof:.4f}, {len(p['members']) - 1} members, commit {p['git_commit'][:10]}"


def upload(run: str, message: str | None = None, client: KaggleClient | None = None) -> None:
    csv = paths.submissions_dir() / f"{run}.csv"
    if not csv.exists():
        raise UserError(f"{csv}: not found (make submit RUN={run} first)")
    message = message or upload_message(run)
    (client or RealKaggle()).submit(csv, message)
    print(f"uploaded {csv}: {message}")


def leaderboard(client: KaggleClient | None = None) -> list[dict]:
    """Your submissions to the competition, newest first, with their public and private scores."""
    rows = (client or RealKaggle()).submissions()
    if not rows:
        print("no submissions yet")
    for row in rows:
        print(
            f"{str(row['date'])[:19]:19}  {str(row['status']):10}  public {str(row['public_score']):8}  "
            f"private {str(row['private_score']):8}  {row['description']}"
        )
    return rows
