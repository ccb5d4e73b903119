"""Kaggle submissions: upload a CSV with a message from its provenance, list your submissions and their scores."""

from __future__ import annotations

import json

from seedlings import paths
from seedlings.errors import UserError
from seedlings.fetch import KaggleClient, RealKaggle


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
