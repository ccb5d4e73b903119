"""Stratified K folds with byte-identical images grouped, computed once into data/folds/*.csv (file, species, fold)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from seedlings import paths
from seedlings.data.competition import Competition, listing_hash, parallel_map, scan_competition
from seedlings.defaults import FOLD_SEED, N_FOLDS
from seedlings.errors import UserError
from seedlings.storage import file_sha256, write_csv, write_json


def dataset_key(comp: Competition) -> str:
    """A short hash of the training files' names and sizes: two datasets with the same folder name stay apart."""
    return listing_hash([comp.train_path(f) for f in comp.train_files], comp.train_files, with_mtime=False)


def default_folds_path(comp: Competition, n_folds: int, seed: int) -> Path:
    return paths.folds_dir() / f"{comp.root.resolve().name}-{dataset_key(comp)}-k{n_folds}-s{seed}.csv"


def assign_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int, n_classes: int = 0) -> np.ndarray:
    """Fold index per image: stratified by label, each group of identical images in one fold."""
    counts = np.bincount(labels, minlength=n_classes)  # minlength: an empty last class counts too
    if counts.min() < n_folds:
        smallest = int(counts.min())
        raise UserError(f"--n-folds: {n_folds} folds need at least {n_folds} images per species (smallest: {smallest})")
    fold = np.full(len(labels), -1)
    from sklearn.model_selection import StratifiedGroupKFold  # here: opening a run reads its folds, never splits

    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold[val] = k
    return fold


def scanned(comp: Competition | str | Path) -> Competition:
    """A competition already scanned (a run's), or its folder, scanned here (its test/ is not needed for folds)."""
    return comp if isinstance(comp, Competition) else scan_competition(comp, need_test=False)


def make_folds(
    comp: Competition | str | Path,
    n_folds: int = N_FOLDS,
    seed: int = FOLD_SEED,
    out: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write the folds CSV (and a .json of its parameters beside it); same parameters again: nothing to do."""
    if n_folds < 2:
        raise UserError(f"--n-folds: at least 2, got {n_folds}")
    comp = scanned(comp)
    out = Path(out) if out else default_folds_path(comp, n_folds, seed)
    params = {"data": str(comp.root.resolve()), "dataset_key": dataset_key(comp), "n_folds": n_folds, "seed": seed}
    meta = out.with_suffix(".json")
    if out.exists() and not force:
        old = json.loads(meta.read_text()) if meta.exists() else {}
        same = {k: old.get(k) for k in ("dataset_key", "n_folds", "seed")} == {
            k: params[k] for k in ("dataset_key", "n_folds", "seed")
        }
        if same:
            check_folds_match(pd.read_csv(out), comp, out)
            print(f"{out}: up to date")
            return out
        raise UserError(f"{out}: exists with other parameters ({old or 'unknown'}); use --force to overwrite")
    digests = parallel_map(file_sha256, [comp.train_path(f) for f in comp.train_files], desc="hash")
    _, groups = np.unique(np.array(digests), return_inverse=True)
    labels = np.array(comp.train_labels)
    fold = assign_folds(labels, groups, n_folds, seed, len(comp.classes))
    df = pd.DataFrame({"file": comp.train_files, "species": [comp.classes[i] for i in labels], "fold": fold})
    write_json(meta, {**params, "duplicate_groups": int(len(digests) - groups.max() - 1)})
    write_csv(out, df)  # last: the CSV's presence means its parameters are written
    print(f"{out}: {len(df)} images, {n_folds} folds, {len(df) - groups.max() - 1} duplicates grouped")
    return out


def check_folds_match(df: pd.DataFrame, comp: Competition, where: Path) -> None:
    if list(df.columns) != ["file", "species", "fold"]:
        raise UserError(f"{where}: expected columns file,species,fold, got {','.join(map(str, df.columns))}")
    have, want = set(df.file), set(comp.train_files)
    if have != want:
        raise UserError(
            f"{where}: does not match the dataset in {comp.root} ({len(have - want)} files not in it, "
            f"{len(want - have)} of its files missing); make folds again with --force or another --out"
        )


def load_folds(comp: Competition | str | Path, n_folds: int = N_FOLDS, seed: int = FOLD_SEED) -> pd.DataFrame:
    """The folds of (competition, n_folds, seed), created when missing, in the dataset's file order."""
    comp = scanned(comp)
    out = default_folds_path(comp, n_folds, seed)
    if not out.exists():
        make_folds(comp, n_folds, seed)
    df = pd.read_csv(out)
    check_folds_match(df, comp, out)
    return df.set_index("file").loc[comp.train_files].reset_index()
