"""`seedlings runs`: one row per run under runs/ (or per trial of a sweep), from the files each run left behind:
its config.yaml (what differs from a reference recipe), its folds' done.json, its submission's provenance JSON, and
the scores `make leaderboard` last saw. A run from older code or a half-trained one shows what it has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from seedlings import defaults, paths
from seedlings.errors import UserError
from seedlings.recipe.load import load_recipe
from seedlings.recipe.schema import PROVENANCE_KEYS, SPLIT_KEYS, recipe_dict
from seedlings.run import differences, read_config
from seedlings.storage import write_csv

COLUMNS = ("run", "data", "differs", "variant", "folds", "fold_f1", "oof_f1", "oof_log_loss", "seconds", "submission",
           "public", "private")  # fmt: skip
LEADERBOARD = "leaderboard.csv"  # under submissions/: what `make leaderboard` last saw, one row per submission


def leaderboard_path() -> Path:
    return paths.submissions_dir() / LEADERBOARD


def save_leaderboard(rows: list[dict]) -> Path:
    """What `make leaderboard` saw, newest first (data.kaggle.submission_row's keys)."""
    board = pd.DataFrame(rows, columns=["date", "description", "status", "public_score", "private_score"])
    return write_csv(leaderboard_path(), board)


def run_folders(sweep: str | None = None) -> list[Path]:
    """Every folder holding a run's config.yaml: the runs under runs/, or a sweep's trials under runs/<sweep>/."""
    top = paths.run_dir(sweep) if sweep else paths.run_dir("")
    if sweep and not top.is_dir():
        raise UserError(f"{top}: no such sweep (its trials live in runs/<sweep>/trial-<n>)")
    return sorted(p.parent for p in top.glob("*/config.yaml"))


def folds_of(folder: Path, config: dict) -> tuple[list[dict], int]:
    """The done.json of each finished fold, and how many folds the run's recipe trains."""
    done = [json.loads(p.read_text()) for p in sorted(folder.glob("fold*/done.json"))]
    n_folds, train_folds = int(config.get("n_folds", 0)), int(config.get("train_folds", 0) or 0)
    return done, min(train_folds, n_folds) if train_folds else n_folds


def provenance(name: str) -> dict:
    path = paths.submission_path(name).with_suffix(".json")
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def leaderboard_scores() -> pd.DataFrame:
    path = leaderboard_path()
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else pd.DataFrame()


def scored(board: pd.DataFrame, name: str) -> dict:
    """The newest scored Kaggle submission whose message names the run (upload's default message starts 'RUN:')."""
    if board.empty:
        return {}
    rows = board[board.description.str.match(re.escape(name) + ":") & (board.public_score != "")]
    return rows.iloc[0].to_dict() if len(rows) else {}


def run_row(folder: Path, name: str, reference: dict, board: pd.DataFrame) -> dict:
    config = read_config(folder / "config.yaml") or {}
    recipe = {k: v for k, v in config.items() if k not in (*SPLIT_KEYS, *PROVENANCE_KEYS)}
    differs = [f"{k}={new}" for k, _, new in differences(reference, recipe) if new is not None]  # None: older code
    split = {"n_folds": defaults.N_FOLDS, "fold_seed": defaults.FOLD_SEED}  # another split: other folds, other OOF
    differs += [f"{k}={config[k]}" for k, v in split.items() if config.get(k, v) != v]
    done, planned = folds_of(folder, config)
    prov = provenance(name)
    blend = prov.get("members", {}).get("blend", {})
    lb = scored(board, name)
    return {
        "run": name,
        "data": Path(str(config.get("data", ""))).name,
        "differs": " ".join(differs),
        "variant": prov.get("variant", ""),  # the submission's prediction keys, where not the run's own
        "folds": f"{len(done)}/{planned}",
        "fold_f1": sum(d["val_f1"] for d in done) / len(done) if done else None,
        "oof_f1": blend.get("micro_f1"),
        "oof_log_loss": blend.get("log_loss"),
        "seconds": sum(prov["seconds"].values()) if prov.get("seconds") else None,
        "submission": prov.get("submission", ""),
        "public": lb.get("public_score", ""),
        "private": lb.get("private_score", ""),
    }


def runs_table(reference: str | None, sweep: str | None = None, sort: str = "oof_f1",
               ascending: bool = False) -> pd.DataFrame:  # fmt: skip
    """Every run (or sweep trial) as a row of COLUMNS, sorted by one column (runs without a value last)."""
    ref = recipe_dict(load_recipe(reference, []))
    board = leaderboard_scores()
    prefix = f"{sweep}/" if sweep else ""
    rows = [run_row(f, prefix + f.name, ref, board) for f in run_folders(sweep)]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    if sweep:
        table = with_trial_states(table, paths.run_dir(sweep) / "trials.csv")
    if sort not in table.columns:
        raise UserError(f"--sort: expected one of {', '.join(table.columns)}, got {sort!r}")
    return table.sort_values(sort, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


def with_trial_states(table: pd.DataFrame, trials_csv: Path) -> pd.DataFrame:
    """A sweep's rows with each trial's state and value, from the trials.csv its report wrote (when there is one)."""
    if not trials_csv.exists():
        return table
    trials = pd.read_csv(trials_csv).drop_duplicates("number", keep="last").set_index("number")
    number = table.run.str.extract(r"trial-(\d+)$")[0].astype(float)
    table.insert(1, "state", number.map(trials.state).fillna(""))
    table.insert(2, "value", number.map(trials.value))
    return table


def show(table: pd.DataFrame, csv: bool = False) -> str:
    """The table as CSV (for scripts) or as aligned text (scores to 4 places, seconds whole)."""
    if csv:
        return table.to_csv(index=False)
    if table.empty:
        return "no runs yet"
    shown = table.copy()
    for col in [c for c in ("value", "fold_f1", "oof_f1", "oof_log_loss") if c in shown]:
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["seconds"] = shown["seconds"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    shown["submission"] = shown["submission"].map(lambda s: Path(s).name if s else "")
    if not shown["variant"].astype(bool).any():
        shown = shown.drop(columns="variant")  # no submission of a variant: a column of blanks says nothing
    return shown.to_string(index=False)
