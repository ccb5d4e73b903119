"""The accuracy benchmark: baselines and the recipe on one held-out split of the data, in one run, side by side.

Every row is trained on the same labelled images and graded on the same held-out ones (`seedlings holdout`), with
micro-F1, macro-F1 and the wall seconds it took on this machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from seedlings import paths
from seedlings.config import Recipe, apply_override, lrs_of, parse_value, recipe_dict, recipe_from_dict

# The README's ablations: the recipe with one technique switched (overrides on top of the recipe; @names depend on
# the recipe's own stages). Fold blending is the chain row against the fold-0 row; snapshot blends are graded by
# `seedlings grade --run`.
ABLATIONS: dict[str, list[str]] = {
    "no precompute: head by 2 SGDR epochs through the frozen net": [
        "stages.0.precompute=false", "stages.0.fit=sgdr", "stages.0.lr=3e-3", "stages.0.cycle_len=2",
    ],
    "head by 8 SGDR epochs on the features, not solved": [
        "stages.0.fit=sgdr", "stages.0.lr=3e-3", "stages.0.cycle_len=8",
    ],
    "batch-norm statistics follow the batches": ["bn_stats=batch"],
    "one learning rate for all layer groups": ["@one_lr"],
    "restarts switched (one cycle <-> two of half the length)": ["@restarts"],
    "sizes switched (one size <-> last 2 epochs at 1.25x)": ["@sizes"],
    "no TTA": ["tta=none"],
}  # fmt: skip


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


def fold_row(recipe: Recipe, holdout: Path, run: str, label: str, n_folds: int, fold_seed: int) -> dict:
    """Fold 0 of the recipe: trained, predicted with its TTA, and its last model graded alone on the held-out images."""
    from seedlings.images import scan_competition
    from seedlings.predict import predict_fold
    from seedlings.train import train_fold

    start = time.perf_counter()
    train_fold(recipe, holdout, run, 0, n_folds, fold_seed)
    last = predict_fold(recipe, holdout, run, 0, n_folds, fold_seed)[-1]
    files = last.load_files("test")
    y = answers_of(holdout, files, scan_competition(holdout).classes)
    return row(f"{label}: fold 0 alone", y, last.load("test").argmax(1), time.perf_counter() - start, last.name)


PREDICTION_KEYS = {"tta", "tta_mean", "predict_size"}  # recipe keys that change prediction only, not training


def predict_row(recipe: Recipe, holdout: Path, run: str, label: str, n_folds: int, fold_seed: int) -> dict:
    """Fold 0's trained model of `run`, predicted on the held-out images with the recipe's (other) TTA settings."""
    import torch

    from seedlings.cache import load_cache
    from seedlings.predict import fold_members, tta_probs
    from seedlings.train import prepare_fold

    start = time.perf_counter()
    fd = prepare_fold(recipe, holdout, run, 0, n_folds, fold_seed)
    name, weights = fold_members(run, 0, recipe)[-1]
    fd.model.load_state_dict(torch.load(weights, map_location=fd.device, weights_only=True))
    test = load_cache(fd.comp, "test", recipe.cache_size)
    probs = tta_probs(fd, test.images, np.arange(len(test.files)), recipe.eval_size, recipe.tta)
    y = answers_of(holdout, test.files, fd.comp.classes)
    seconds = time.perf_counter() - start + json_seconds(paths.fold_dir(run, 0) / "done.json")
    return row(f"{label}: fold 0 alone", y, probs.argmax(1), seconds, f"{name}, {recipe.tta}, fold 0 of the recipe")


def json_seconds(path: Path) -> float:
    return float(json.loads(path.read_text())["seconds"])


def chain_row(recipe: Recipe, holdout: Path, run: str, label: str, n_folds: int, fold_seed: int) -> dict:
    """The whole chain (make submit) on the split: every fold the recipe trains, predicted, blended, written."""
    from seedlings.images import scan_competition
    from seedlings.submit import submit

    classes = scan_competition(holdout).classes
    start = time.perf_counter()
    csv = submit(recipe, holdout, run, n_folds, fold_seed)
    seconds = time.perf_counter() - start
    sub = pd.read_csv(csv)
    y = answers_of(holdout, sub.file.tolist(), classes)
    pred = np.array([classes.index(s) for s in sub.species])
    models = len(recipe.folds(n_folds))
    return row(f"{label}: whole chain (make submit)", y, pred, seconds, f"{models} fold model(s) of {n_folds}, blended")


def variant(recipe: Recipe, overrides: list[str]) -> Recipe:
    """The recipe with overrides; @names are the ablations that depend on the recipe's own stages."""
    values = recipe_dict(recipe)
    stages = values["stages"]
    unfrozen = [s for s in stages if not s["freeze"]]
    for item in overrides:
        if item == "@one_lr":
            for s in unfrozen:
                s["lr"] = max(lrs_of(s["lr"], values["layer_groups"]))
        elif item == "@restarts":
            for s in unfrozen:
                total = sum(s["cycle_len"] * s["cycle_mult"] ** i for i in range(s["n_cycles"]))
                if s["n_cycles"] > 1:
                    s.update(n_cycles=1, cycle_len=total, cycle_mult=1)
                elif total % 2 == 0:
                    warmup = s["warmup"] if s["warmup"] < total // 2 else 0.0
                    s.update(n_cycles=2, cycle_len=total // 2, cycle_mult=1, warmup=warmup)
        elif item == "@sizes":
            if len({s["size"] for s in unfrozen}) > 1:
                for s in stages:
                    s["size"] = stages[-1]["size"]
            elif unfrozen and unfrozen[-1]["n_cycles"] == 1 and unfrozen[-1]["cycle_len"] > 2:
                last = unfrozen[-1]
                last["cycle_len"] -= 2
                grown = round(last["size"] * 1.25 / 16) * 16
                lr = (
                    {"max": max(lrs_of(last["lr"], values["layer_groups"])) / 4, "mult": last["lr"]["mult"]}
                    if isinstance(last["lr"], dict)
                    else last["lr"]
                )
                stages.append({**last, "size": grown, "lr": lr, "cycle_len": 2, "warmup": 0.0})
        else:
            key, text = item.split("=", 1)
            apply_override(values, key, parse_value(text))
    return recipe_from_dict(values)


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
    probes_only: bool = False,
) -> pd.DataFrame:
    """The table (also runs/<run>-holdout/compare.csv): probes at the data's own size and at 224 px, one fold of the
    recipe, the whole chain, and with `ablations` the chain once per technique switched off."""
    holdout = ensure_holdout(data, fraction, seed)
    run = f"{run}-holdout"  # never the run trained on all of DATA: other images, other models
    sizes = sizes or (own_size(holdout), 224)
    rows = [probe_row(recipe, holdout, s, n_folds, fold_seed) for s in dict.fromkeys(sizes)]
    if probes_only:
        return finish(rows, run, holdout)
    # the chain first: its fold 0 is then already trained and predicted, and the fold row only grades it (its
    # seconds are the chain's fold-0 training and prediction, read back from the run)
    chain_start = time.perf_counter()
    chain = chain_row(recipe, holdout, run, "recipe", n_folds, fold_seed)
    chain["seconds"] = round(time.perf_counter() - chain_start, 1)
    fold = fold_row(recipe, holdout, run, "recipe", n_folds, fold_seed)
    fold["seconds"] = round(fold_seconds(run, 0), 1)
    rows += [fold, chain]
    if ablations:  # fold 0 alone for each: the chain's cost would be the folds' count times this
        for i, (name, overrides) in enumerate(ABLATIONS.items()):
            changed = variant(recipe, overrides)
            if changed == recipe:
                rows.append({"what": f"ablation: {name}", "how": "same as the recipe here: not run"})
            elif {k for k, v in recipe_dict(changed).items() if recipe_dict(recipe)[k] != v} <= PREDICTION_KEYS:
                rows.append(predict_row(changed, holdout, run, f"ablation: {name}", n_folds, fold_seed))
            else:
                rows.append(fold_row(changed, holdout, f"{run}-ablation{i}", f"ablation: {name}", n_folds, fold_seed))
    return finish(rows, run, holdout)


def finish(rows: list[dict], run: str, holdout: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    out = paths.run_dir(run) / "compare.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.4f")
    print(format_compare(table, holdout))
    print(f"{out}")
    return table


def fold_seconds(run: str, fold: int) -> float:
    """Training (done.json) plus prediction (probs/*.json) seconds of one fold of a run."""
    from seedlings.predict import probs_dir

    train = json_seconds(paths.fold_dir(run, fold) / "done.json")
    predict = sum(json.loads(p.read_text())["seconds"] for p in probs_dir(run).glob(f"fold{fold}-*.json"))
    return train + predict


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
