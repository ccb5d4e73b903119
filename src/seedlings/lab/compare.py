"""The accuracy benchmark: baselines and the recipe on one held-out split of the data, in one run, side by side.

Every row is trained on the same labelled images and graded on the same held-out ones (`seedlings holdout`), with
micro-F1, macro-F1 and the wall seconds it took on this machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seedlings.data.competition import read_image, scan_competition
from seedlings.lab.ablations import ablation_rows
from seedlings.lab.holdout import chain_row, ensure_holdout, fold_row, fold_seconds
from seedlings.lab.probe import PROBE_MODEL, probe_rows
from seedlings.recipe.schema import Recipe
from seedlings.run import Run, open_run
from seedlings.storage import write_csv


def compare(
    run: Run,
    fraction: float = 0.2,
    seed: int = 0,
    ablations: dict[str, dict[str, Any]] | None = None,
    sizes: tuple[int, ...] = (),
    probes_only: bool = False,
    baseline: tuple[str, Recipe | None] = ("", None),
    probe_model: str = PROBE_MODEL,
) -> pd.DataFrame:
    """The table (also runs/<run>-holdout/compare.csv): the baseline probe (`probe_model`) at the data's own size
    and at 224 px, the recipe's own backbone's probe, one fold of the recipe, the whole chain, and with `ablations`
    ({row label: recipe keys changed}, ablations.load_ablations) fold 0 once per technique switched. baseline: (name,
    recipe) of another recipe (the one this replaced, say) whose fold and chain rows join the table, trained on the
    same split."""
    holdout = ensure_holdout(run.data, fraction, seed)
    # never the run trained on all of DATA: other images, other models
    held = open_run(f"{run.name}-holdout", holdout, run.recipe, run.n_folds, run.fold_seed)
    sizes = sizes or (own_size(holdout), 224)
    rows = probe_rows(held, sizes, probe_model)
    if probes_only:
        return finish(rows, held)
    label, other = baseline
    if other is not None:
        rows += recipe_rows(open_run(f"{held.name}-{label}", holdout, other, run.n_folds, run.fold_seed), label)
    rows += recipe_rows(held, "recipe")
    if ablations:
        rows += ablation_rows(held, ablations)
    return finish(rows, held)


def recipe_rows(run: Run, label: str) -> list[dict]:
    """Fold 0 alone and the whole chain of one recipe on a held-out split, graded on its answers."""
    # the chain first: its fold 0 is then already trained and predicted, and the fold row only grades it (its
    # seconds are the chain's fold-0 training and prediction, read back from the run)
    chain_start = time.perf_counter()
    chain = chain_row(run, label)
    chain["seconds"] = round(time.perf_counter() - chain_start, 1)
    fold = fold_row(run, label)
    fold["seconds"] = round(fold_seconds(run, 0), 1)
    return [fold, chain]


def finish(rows: list[dict], run: Run) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    out = write_csv(run.dir / "compare.csv", table, float_format="%.4f")
    print(format_compare(table, run.data))
    print(f"{out}")
    return table


def own_size(holdout: Path) -> int:
    """The median longer side of the training images: the probe's 'native' size for this data."""
    comp = scan_competition(holdout)
    every = max(1, len(comp.train_files) // 200)  # 200 images tell the median
    sides = [max(read_image(comp.train_path(f)).shape[:2]) for f in comp.train_files[::every]]
    return int(np.median(sides))


def format_compare(table: pd.DataFrame, holdout: Path) -> str:
    lines = [f"held-out images of {holdout}: micro-F1, macro-F1, wall seconds"]
    width = max(len(w) for w in table.what)
    for entry in table.itertuples():
        if pd.isna(getattr(entry, "micro_f1", np.nan)):
            lines.append(f"{entry.what:<{width}}  {'':>8}  {'':>8}  {'':>7}  {entry.how}")
        else:
            scores = f"{entry.micro_f1:8.4f}  {entry.macro_f1:8.4f}  {entry.seconds:7.0f}"
            lines.append(f"{entry.what:<{width}}  {scores}  {entry.how}")
    return "\n".join(lines)
