"""`seedlings runs`: one row per run under runs/ (or per trial of a sweep), from the files each run left behind:
its config.yaml (what differs from a reference recipe), its folds' done.json, its submission's provenance JSON, and
the scores `make leaderboard` last saw. A run from older code or a half-trained one shows what it has."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from seedlings import defaults, paths
from seedlings.errors import UserError
from seedlings.recipe.load import dump_yaml, load_recipe
from seedlings.recipe.schema import PROVENANCE_KEYS, SPLIT_KEYS, recipe_dict
from seedlings.run import differences, read_config
from seedlings.storage import finite_number, write_csv

COLUMNS = ("run", "date", "data", "model", "differs", "variant", "folds", "fold_f1", "oof_f1", "oof_log_loss",
           "seconds", "submission", "public", "private")  # fmt: skip
NARROW = ("private", "public", "submission", "oof_log_loss", "seconds", "data", "fold_f1", "date", "variant", "model")
# left out in this order where the terminal is too narrow for every column and MIN_DIFFERS characters of `differs`
MIN_DIFFERS = 16
DAMAGED = "damaged"  # what the table shows for a file it cannot read
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


def read_json_quietly(path: Path) -> object:
    """A JSON file's contents, DAMAGED where it cannot be read as JSON, None where it is not there."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except (OSError, ValueError):
        return DAMAGED


def folds_of(folder: Path, config: dict) -> tuple[list[float], str]:
    """The validation micro-F1 of each finished fold (done.json) that says it, and "done/planned" (the folds the run's
    recipe trains; a damaged done.json or split is said, not fatal)."""
    records = [read_json_quietly(p) for p in sorted(folder.glob("fold*/done.json"))]
    scores = [finite_number(r.get("val_f1")) if isinstance(r, dict) else None for r in records]
    try:
        n_folds, train_folds = int(config.get("n_folds", 0)), int(config.get("train_folds", 0) or 0)
        planned = str(min(train_folds, n_folds) if train_folds else n_folds)
    except (TypeError, ValueError):
        planned = "?"
    damaged = sum(s is None for s in scores)
    shown = f"{len(records)}/{planned}" + (f" ({damaged} done.json {DAMAGED})" if damaged else "")
    return [s for s in scores if s is not None], shown


def provenance(path: Path) -> dict | str:
    """A submission's provenance ({}: none yet), or DAMAGED where it is not a mapping."""
    record = read_json_quietly(path)
    return {} if record is None else record if isinstance(record, dict) else DAMAGED


def leaderboard_scores() -> pd.DataFrame:
    """What `make leaderboard` last saw; a damaged file is said on stderr and read as none."""
    path = leaderboard_path()
    if not path.exists():
        return pd.DataFrame()
    try:
        board = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        board = pd.DataFrame()
    if not {"description", "public_score", "private_score"} <= set(board.columns):
        print(f"warning: {path}: {DAMAGED}, its scores left out; make leaderboard writes it again", file=sys.stderr)
        return pd.DataFrame()
    return board


def scored(board: pd.DataFrame, name: str) -> dict:
    """The newest scored Kaggle submission whose message names the run (upload's default message starts 'RUN:')."""
    if board.empty:
        return {}
    rows = board[board.description.str.match(re.escape(name) + ":") & (board.public_score != "")]
    return rows.iloc[0].to_dict() if len(rows) else {}


def run_row(folder: Path, name: str, reference: dict, board: pd.DataFrame) -> dict:
    """One run's row; a damaged file shows as damaged in its columns and leaves the others (and other runs) shown."""
    try:
        config, differs = read_config(folder / paths.CONFIG) or {}, []
    except UserError:
        config, differs = {}, [f"config.yaml {DAMAGED}"]
    recipe = {k: v for k, v in config.items() if k not in (*SPLIT_KEYS, *PROVENANCE_KEYS)}
    differs += differing(reference, recipe)
    split = {"n_folds": defaults.N_FOLDS, "fold_seed": defaults.FOLD_SEED}  # another split: other folds, other OOF
    differs += [f"{k}={config[k]}" for k, v in split.items() if config.get(k, v) != v]
    scores, folds = folds_of(folder, config)
    prov_path = paths.submission_path(name).with_suffix(".json")
    prov = provenance(prov_path)
    submission = f"{prov_path.name} {DAMAGED}" if prov == DAMAGED else ""
    prov = prov if isinstance(prov, dict) else {}
    members = prov.get("members")
    blend = members.get("blend") if isinstance(members, dict) else None
    blend = blend if isinstance(blend, dict) else {}
    seconds = prov.get("seconds")
    seconds = [finite_number(v) for v in seconds.values()] if isinstance(seconds, dict) else []
    lb = scored(board, name)
    written = [p.stat().st_mtime for p in (folder / paths.CONFIG, prov_path) if p.exists()]
    return {
        "run": name,
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(max(written))) if written else "",
        "data": Path(str(config.get("data", ""))).name,
        "model": str(config.get("model", "")),
        "differs": " ".join(differs),
        "variant": str(prov.get("variant", "") or ""),  # the submission's prediction keys, where not the run's own
        "folds": folds,
        "fold_f1": sum(scores) / len(scores) if scores else None,
        "oof_f1": finite_number(blend.get("micro_f1")),
        "oof_log_loss": finite_number(blend.get("log_loss")),
        "seconds": sum(seconds) if seconds and None not in seconds else None,
        "submission": submission or str(prov.get("submission", "") or ""),
        "public": lb.get("public_score", ""),
        "private": lb.get("private_score", ""),
    }


def differing(reference, recipe, key: str = "") -> list[str]:
    """`key=value` for each leaf of `recipe` that differs from `reference`, dotted (stages.1.size=160), values as YAML
    writes them inline; a stage the reference has and the run lacks is `stages.k=-`; a key the run's recipe lacks
    (older code) is left out."""
    words = []
    for k, old, new in differences(reference, recipe, key):
        if new is None:
            continue
        if isinstance(old, list) and isinstance(new, list):  # of other lengths (equal ones: compared leaf by leaf)
            words += [
                w for i, item in enumerate(new) for w in differing(old[i] if i < len(old) else {}, item, f"{k}.{i}")
            ]
            words += [f"{k}.{i}=-" for i in range(len(new), len(old))]
        elif isinstance(new, dict):
            words += differing(old if isinstance(old, dict) else {}, new, k)
        else:
            words.append(f"{k}={inline(new)}")
    return words


def inline(value) -> str:
    """A recipe value in one short word: 0.001, [0.001, 0.01], {max: 0.01, mult: 3}."""
    return dump_yaml(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


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
    try:
        trials = pd.read_csv(trials_csv)
    except (OSError, ValueError):
        trials = pd.DataFrame()
    if not {"number", "state", "value"} <= set(trials.columns):
        print(f"warning: {trials_csv}: {DAMAGED}, trial states left out; make sweep-report writes it again",
              file=sys.stderr)  # fmt: skip
        return table
    trials = trials.drop_duplicates("number", keep="last").set_index("number")
    number = table.run.str.extract(r"trial-(\d+)$")[0].astype(float)
    table.insert(1, "state", number.map(trials.state).fillna(""))
    table.insert(2, "value", number.map(trials.value))
    return table


def show(table: pd.DataFrame, csv: bool = False, wide: bool = False, width: int = 0) -> str:
    """The table as CSV (for scripts) or as aligned text (scores to 4 places, seconds whole), cut to `width` columns (0:
    the terminal's): blank columns left out, then the least read ones, and `differs` cut short (wide: all of it)."""
    if csv:
        return table.to_csv(index=False)
    if table.empty:
        return "no runs yet"
    shown = table.copy()
    for col in [c for c in ("value", "fold_f1", "oof_f1", "oof_log_loss") if c in shown]:
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["seconds"] = shown["seconds"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    shown["submission"] = shown["submission"].map(lambda s: Path(s).name if s else "")
    shown = shown[[c for c in shown.columns if c in ("run", "differs") or shown[c].astype(str).str.len().any()]]
    if wide:
        return shown.to_string(index=False)
    width = width or shutil.get_terminal_size((160, 24)).columns
    for col in [c for c in NARROW if c in shown.columns]:
        if text_width(shown.drop(columns="differs")) + MIN_DIFFERS < width:
            break
        shown = shown.drop(columns=col)
    room = max(MIN_DIFFERS, width - text_width(shown.drop(columns="differs")) - 1)
    shown["differs"] = shown["differs"].map(lambda d: d if len(d) <= room else d[: room - 1] + "…")
    return shown.to_string(index=False)


def text_width(table: pd.DataFrame) -> int:
    return max(len(line) for line in table.to_string(index=False).splitlines())
