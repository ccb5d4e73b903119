"""`seedlings runs`: one row per run under runs/ (or per trial of a sweep), from the files each run left behind:
its config.yaml (what differs from a reference recipe), its folds' done.json, its submission's provenance JSON, and
the scores `make leaderboard` last saw. A run from older code or a half-trained one shows what it has. The table is a
list of rows (dicts) printed by hand: neither pandas nor the pipeline loads for it, so it answers within a second."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

from seedlings import defaults, paths
from seedlings.errors import UserError
from seedlings.recipe.load import dump_yaml, load_recipe
from seedlings.recipe.saved import differences, read_config
from seedlings.recipe.schema import PROVENANCE_KEYS, SPLIT_KEYS, recipe_dict
from seedlings.storage import finite_number, write_text

COLUMNS = ("run", "date", "data", "model", "differs", "variant", "folds", "fold_f1", "oof_f1", "oof_log_loss",
           "seconds", "submission", "public", "private")  # fmt: skip
NARROW = ("private", "public", "submission", "oof_log_loss", "seconds", "data", "fold_f1", "date", "variant", "model")
# left out in this order where the terminal is too narrow for every column and MIN_DIFFERS characters of `differs`
MIN_DIFFERS = 16
DAMAGED = "damaged"  # what the table shows for a file it cannot read
BOARD_COLUMNS = ("date", "description", "status", "public_score", "private_score")
LEADERBOARD = "leaderboard.csv"  # under submissions/: what `make leaderboard` last saw, one row per submission


def leaderboard_path() -> Path:
    return paths.submissions_dir() / LEADERBOARD


def save_leaderboard(rows: list[dict]) -> Path:
    """What `make leaderboard` saw, newest first (data.kaggle.submission_row's keys)."""
    return write_text(leaderboard_path(), csv_text(rows, BOARD_COLUMNS))


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


def leaderboard_scores() -> list[dict]:
    """What `make leaderboard` last saw, as rows of strings; a damaged file is said on stderr and read as none."""
    path = leaderboard_path()
    if not path.exists():
        return []
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
        board = list(reader)
    except (OSError, ValueError, csv.Error):
        board, reader = [], None
    if reader is None or not {"description", "public_score", "private_score"} <= set(reader.fieldnames or ()):
        print(f"warning: {path}: {DAMAGED}, its scores left out; make leaderboard writes it again", file=sys.stderr)
        return []
    return board


def scored(board: list[dict], name: str) -> dict:
    """The newest scored Kaggle submission whose message names the run (upload's default message starts 'RUN:')."""
    mine = re.compile(re.escape(name) + ":")
    return next((row for row in board if mine.match(row.get("description") or "") and row.get("public_score")), {})


def run_row(folder: Path, name: str, reference: dict, board: list[dict]) -> dict:
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
               ascending: bool = False) -> list[dict]:  # fmt: skip
    """Every run (or sweep trial) as a row of COLUMNS, sorted by one column (runs without a value last)."""
    ref = recipe_dict(load_recipe(reference, []))
    board = leaderboard_scores()
    prefix = f"{sweep}/" if sweep else ""
    rows = [run_row(f, prefix + f.name, ref, board) for f in run_folders(sweep)]
    if sweep:
        rows = with_trial_states(rows, paths.run_dir(sweep) / "trials.csv")
    columns = list(rows[0]) if rows else list(COLUMNS)
    if sort not in columns:
        raise UserError(f"--sort: expected one of {', '.join(columns)}, got {sort!r}")
    present = [r for r in rows if not missing(r[sort])]
    present.sort(key=lambda r: (isinstance(r[sort], str), r[sort]), reverse=not ascending)
    return present + [r for r in rows if missing(r[sort])]


def missing(value) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def with_trial_states(rows: list[dict], trials_csv: Path) -> list[dict]:
    """A sweep's rows with each trial's state and value, from the trials.csv its report wrote (when there is one)."""
    if not trials_csv.exists():
        return rows
    try:
        reader = csv.DictReader(io.StringIO(trials_csv.read_text(encoding="utf-8"), newline=""))
        trials = {int(float(row["number"])): row for row in reader}  # the last row of a number wins
    except (OSError, ValueError, TypeError, csv.Error, KeyError):
        reader = None
    if reader is None or not {"number", "state", "value"} <= set(reader.fieldnames or ()):
        print(f"warning: {trials_csv}: {DAMAGED}, trial states left out; make sweep-report writes it again",
              file=sys.stderr)  # fmt: skip
        return rows
    shown = []
    for row in rows:
        number = re.search(r"trial-(\d+)$", row["run"])
        trial = trials.get(int(number.group(1)), {}) if number else {}
        value = number_in(trial.get("value"))
        shown.append({"run": row["run"], "state": trial.get("state", ""), "value": value, **row})
    return shown


def number_in(text: str | None) -> float | None:
    """A number written in a CSV cell; None where the cell is empty or not a number."""
    try:
        return finite_number(float(text)) if text else None
    except ValueError:
        return None


def show(rows: list[dict], csv: bool = False, wide: bool = False, width: int = 0) -> str:
    """The table as CSV (for scripts) or as aligned text (scores to 4 places, seconds whole), cut to `width` columns (0:
    the terminal's): blank columns left out, then the least read ones, and `differs` cut short (wide: all of it)."""
    if csv:
        return csv_text(rows, list(rows[0]) if rows else list(COLUMNS))
    if not rows:
        return "no runs yet"
    shown = {col: [cell(col, row[col]) for row in rows] for col in rows[0]}
    shown = {col: cells for col, cells in shown.items() if col in ("run", "differs") or any(cells)}
    if wide:
        return aligned(shown)
    width = width or shutil.get_terminal_size((160, 24)).columns
    for col in [c for c in NARROW if c in shown]:
        if text_width({c: v for c, v in shown.items() if c != "differs"}) + MIN_DIFFERS < width:
            break
        del shown[col]
    room = max(MIN_DIFFERS, width - text_width({c: v for c, v in shown.items() if c != "differs"}) - 1)
    shown["differs"] = [d if len(d) <= room else d[: room - 1] + "…" for d in shown["differs"]]
    return aligned(shown)


def cell(column: str, value) -> str:
    """A value as the table prints it: scores to 4 places, seconds whole, a submission by its file's name."""
    if missing(value):
        return ""
    if column in ("value", "fold_f1", "oof_f1", "oof_log_loss"):
        return f"{value:.4f}"
    if column == "seconds":
        return f"{value:.0f}"
    return Path(value).name if column == "submission" else str(value)


def aligned(columns: dict[str, list[str]]) -> str:
    """Columns right-aligned under their names, one space apart."""
    widths = {col: max(len(col), *map(len, cells)) for col, cells in columns.items()}
    lines = [" ".join(col.rjust(widths[col]) for col in columns)]
    lines += [
        " ".join(columns[col][i].rjust(widths[col]) for col in columns)
        for i in range(len(next(iter(columns.values()))))
    ]
    return "\n".join(lines)


def text_width(columns: dict[str, list[str]]) -> int:
    return sum(max(len(col), *map(len, cells)) for col, cells in columns.items()) + len(columns) - 1


def csv_text(rows: list[dict], columns) -> str:
    """Rows as CSV with a header, empty where a value is missing, Unix line ends."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: "" if missing(v) else v for k, v in row.items()} for row in rows)
    return out.getvalue()
