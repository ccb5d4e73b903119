"""The one-command chain: folds, train every fold, predict, blend, write and validate submissions/<run>.csv."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from seedlings import paths
from seedlings.config import Recipe, recipe_dict, recipe_from_dict
from seedlings.ensemble import assemble, blend, format_table
from seedlings.errors import UserError
from seedlings.folds import load_folds
from seedlings.images import scan_competition
from seedlings.predict import Member, predict_run
from seedlings.report import write_report
from seedlings.submission import species_of, validate_submission, write_submission
from seedlings.train import git_commit, train_fold


def run_recipe(run: str) -> Recipe:
    """The recipe a finished run was trained with (its runs/<run>/config.yaml)."""
    path = paths.run_dir(run) / "config.yaml"
    if not path.exists():
        raise UserError(f"{path}: run {run!r} not found (train it first)")
    data = yaml.safe_load(path.read_text())
    data.pop("git_commit", None)
    return recipe_from_dict(data)


def submit(
    recipe: Recipe,
    data: str | Path,
    run: str,
    n_folds: int = 5,
    fold_seed: int = 0,
    runs: list[str] | None = None,
    weights: str = "fit",
    command: list[str] | None = None,
) -> Path:
    """Every step skips what is up to date, so a second call with nothing changed takes seconds."""
    timings = {}
    comp = scan_competition(data)
    start = time.perf_counter()
    folds = load_folds(data, n_folds, fold_seed)
    timings["folds"] = time.perf_counter() - start
    start = time.perf_counter()
    for fold in recipe.folds(n_folds):
        train_fold(recipe, data, run, fold, n_folds, fold_seed)
    timings["train"] = time.perf_counter() - start
    start = time.perf_counter()
    members: list[Member] = []
    for r in dict.fromkeys([run, *(runs or [])]):
        members += predict_run(recipe if r == run else run_recipe(r), data, r, n_folds, fold_seed)
    timings["predict"] = time.perf_counter() - start
    start = time.perf_counter()
    files, parts = assemble(members)
    label_of = dict(zip(folds.file, folds.species))
    labels = np.array([comp.classes.index(label_of[f]) for f in files])
    oof, test, table = blend(parts, labels, weights)
    print(format_table(table))
    out = paths.submissions_dir() / f"{run}.csv"
    test_files = members[0].load_files("test")
    write_submission(out, test_files, species_of(test, comp.classes), Path(data) / "sample_submission.csv")
    n_rows = validate_submission(data, out)
    timings["blend"] = time.perf_counter() - start
    oof_table = pd.DataFrame(oof, columns=comp.classes)
    oof_table.insert(0, "file", files)
    oof_table.insert(1, "species", [comp.classes[i] for i in labels])
    oof_table.insert(2, "pred", species_of(oof, comp.classes))
    oof_table.to_csv(paths.run_dir(run) / "oof_blend.csv", index=False, float_format="%.6g")
    provenance = {
        "submission": str(out),
        "rows": n_rows,
        "run": run,
        "runs": list(dict.fromkeys([run, *(runs or [])])),
        "data": str(Path(data).resolve()),
        "n_folds": n_folds,
        "fold_seed": fold_seed,
        "git_commit": git_commit(),
        "recipe": recipe_dict(recipe),
        "weights": weights,
        "members": table,
        "oof_files": len(files),
        "seconds": timings,
        "command": command or [],
    }
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=1))
    report = write_report(run, data)
    print(
        f"{out}: {n_rows} rows, blend OOF micro-F1 {table['blend']['micro_f1']:.4f}; provenance in "
        f"{out.with_suffix('.json')}; report in {report}"
    )
    return out
