"""The accuracy benchmark: baselines and the recipe on one held-out split of the data, in one run, side by side.

Every row is trained on the same labelled images and graded on the same held-out ones (`seedlings holdout`), with
micro-F1, macro-F1 and the wall seconds it took on this machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from seedlings import paths
from seedlings.config import Recipe, apply_override, parse_value, recipe_dict, recipe_from_dict

# The ablations of the README: each switches one technique of the recipe off (overrides on top of the recipe).
ABLATIONS: dict[str, list[str]] = {
    "no precompute (head trained by SGDR through the frozen net)": ["stages.0.precompute=false", "stages.0.fit=sgdr"],
    "head by SGDR epochs on the features, not solved": ["stages.0.fit=sgdr"],
    "batch-norm statistics follow the batches": ["bn_stats=batch"],
    "one learning rate for all layer groups": ["@one_lr"],
    "no restarts (one cosine cycle per stage)": ["@no_restarts"],
    "one size (no progressive resizing)": ["@one_size"],
    "no TTA": ["tta=none"],
    "no snapshot blend (last model only)": ["snapshots=false"],
    "one fold": ["train_folds=1"],
}


def holdout_dir(data: str | Path, fraction: float, seed: int) -> Path:
    return paths.root() / "data" / f"{Path(data).resolve().name}-holdout-f{round(fraction * 100)}-s{seed}"


def ensure_holdout(data: str | Path, fraction: float, seed: int) -> Path:
    from seedlings.demo import make_holdout

    out = holdout_dir(data, fraction, seed)
    return out if out.exists() else make_holdout(data, out, fraction, seed)


def answers_of(holdout: Path, files: list[str], classes: list[str]) -> np.ndarray:
    truth = pd.read_csv(holdout / "answers.csv").set_index("file").species
    return np.array([classes.index(truth[f]) for f in files])


def row(what: str, y: np.ndarray, pred: np.ndarray, seconds: float, how: str) -> dict:
    return {
        "what": what,
        "micro_f1": float(f1_score(y, pred, average="micro")),
        "macro_f1": float(f1_score(y, pred, average="macro")),
        "seconds": round(seconds, 1),
        "how": how,
    }


def probe_row(recipe: Recipe, holdout: Path, size: int, n_folds: int, fold_seed: int) -> dict:
    """The linear probe trained on every labelled image of the split (mirror-averaged features, C by CV)."""
    from seedlings.baseline import fit_logistic, mirror_features, probe_recipe
    from seedlings.cache import load_cache
    from seedlings.train import prepare_fold

    start = time.perf_counter()
    fd = prepare_fold(probe_recipe(recipe, size), holdout, "probe", 0, n_folds, fold_seed)  # every image is used
    every = np.sort(np.concatenate([fd.train_idx, fd.val_idx]))
    x = mirror_features(fd, size, every)
    fit = fit_logistic(x, fd.labels[every], len(fd.comp.classes), seed=recipe.seed)
    test = load_cache(fd.comp, "test", probe_recipe(recipe, size).cache_size)
    pred = fit.logits(mirror_features(fd, size, np.arange(len(test.files)), test.images)).argmax(1)
    y = answers_of(holdout, test.files, fd.comp.classes)
    return row(
        f"linear probe, {recipe.model} features at {size} px", y, pred, time.perf_counter() - start,
        f"logistic regression, C={fit.c:g} by {3}-fold CV, image + mirror features",
    )  # fmt: skip


def recipe_rows(recipe: Recipe, holdout: Path, run: str, label: str, n_folds: int, fold_seed: int) -> list[dict]:
    """One fold of the recipe (trained, predicted with TTA, graded alone), then the whole chain (make submit)."""
    from seedlings.images import scan_competition
    from seedlings.predict import predict_fold
    from seedlings.submit import submit
    from seedlings.train import train_fold

    classes = scan_competition(holdout).classes
    start = time.perf_counter()
    train_fold(recipe, holdout, run, 0, n_folds, fold_seed)
    members = predict_fold(recipe, holdout, run, 0, n_folds, fold_seed)
    fold_seconds = time.perf_counter() - start
    last = members[-1]
    files = last.load_files("test")
    y = answers_of(holdout, files, classes)
    rows = [row(f"{label}: fold 0 alone", y, last.load("test").argmax(1), fold_seconds, f"{last.name}, {recipe.tta}")]
    start = time.perf_counter()
    csv = submit(recipe, holdout, run, n_folds, fold_seed)
    sub = pd.read_csv(csv).set_index("file").species.loc[files]
    n_models = len(recipe.folds(n_folds))
    rows.append(
        row(
            f"{label}: whole chain (make submit)",
            y,
            np.array([classes.index(s) for s in sub]),
            fold_seconds + time.perf_counter() - start,
            f"{n_models} fold model(s), blended",
        )
    )
    return rows


def variant(recipe: Recipe, overrides: list[str]) -> Recipe:
    """The recipe with overrides; @names are the ablations that depend on the recipe's own stages."""
    values = recipe_dict(recipe)
    unfrozen = [s for s in values["stages"] if not s["freeze"]]
    for item in overrides:
        if item == "@one_lr":
            for s in unfrozen:
                s["lr"] = max(_lrs(s["lr"]))
        elif item == "@no_restarts":
            for s in unfrozen:
                total = sum(s["cycle_len"] * s["cycle_mult"] ** i for i in range(s["n_cycles"]))
                s.update(n_cycles=1, cycle_len=total, cycle_mult=1)
        elif item == "@one_size":
            last = values["stages"][-1]["size"]
            for s in values["stages"]:
                s["size"] = last
        else:
            key, text = item.split("=", 1)
            apply_override(values, key, parse_value(text))
    return recipe_from_dict(values)


def _lrs(lr) -> list[float]:
    if isinstance(lr, dict):
        return [lr["max"]]
    return lr if isinstance(lr, list) else [lr]


def compare(
    recipe: Recipe,
    data: str | Path,
    run: str,
    n_folds: int = 5,
    fold_seed: int = 0,
    fraction: float = 0.2,
    seed: int = 0,
    ablations: bool = False,
    sizes: tuple[int, ...] = (),
) -> pd.DataFrame:
    """The table (also runs/<run>-holdout/compare.csv): probes at the data's own size and at 224 px, one fold of the
    recipe, the whole chain, and with `ablations` the chain once per technique switched off."""
    holdout = ensure_holdout(data, fraction, seed)
    run = f"{run}-holdout"  # never the run trained on all of DATA: other images, other models
    sizes = sizes or (own_size(holdout), 224)
    rows = [probe_row(recipe, holdout, s, n_folds, fold_seed) for s in dict.fromkeys(sizes)]
    rows += recipe_rows(recipe, holdout, run, "recipe", n_folds, fold_seed)
    if ablations:
        for i, (name, overrides) in enumerate(ABLATIONS.items()):
            changed = variant(recipe, overrides)
            if changed == recipe or (overrides == ["train_folds=1"] and len(recipe.folds(n_folds)) == 1):
                rows.append({"what": f"ablation: {name}", "how": "same as the recipe: not run"})
                continue
            rows += recipe_rows(changed, holdout, f"{run}-ablation{i}", f"ablation: {name}", n_folds, fold_seed)[1:]
    table = pd.DataFrame(rows)
    out = paths.run_dir(run) / "compare.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.4f")
    print(format_compare(table, holdout))
    print(f"{out}")
    return table


def own_size(holdout: Path) -> int:
    """The median longer side of the training images: the probe's 'native' size for this data."""
    from seedlings.images import read_image, scan_competition

    comp = scan_competition(holdout)
    every = max(1, len(comp.train_files) // 200)  # 200 images tell the median
    sides = [max(read_image(comp.train_path(f)).shape[:2]) for f in comp.train_files[::every]]
    return int(np.median(sides))


def format_compare(table: pd.DataFrame, holdout: Path) -> str:
    lines = [f"held-out images of {holdout}: micro-F1, macro-F1, wall seconds"]
    width = max(len(w) for w in table.what)
    for r in table.itertuples():
        if pd.isna(getattr(r, "micro_f1", np.nan)):
            lines.append(f"{r.what:<{width}}  {'':>8}  {'':>8}  {'':>7}  {r.how}")
        else:
            lines.append(f"{r.what:<{width}}  {r.micro_f1:8.4f}  {r.macro_f1:8.4f}  {r.seconds:7.0f}  {r.how}")
    return "\n".join(lines)
