"""The accuracy benchmark: baselines and the recipe on one held-out split of the data, in one run, side by side.

Every row is trained on the same labelled images and graded on the same held-out ones (`seedlings holdout`), with
micro-F1, macro-F1 and the wall seconds it took on this machine.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from seedlings import paths
from seedlings.baseline import mirror_features, probe_run
from seedlings.cache import load_cache
from seedlings.chain import blend_members, submit
from seedlings.config import PREDICTION_KEYS, Recipe, lrs_of, recipe_dict
from seedlings.context import prepare_fold
from seedlings.features import fit_logistic
from seedlings.files import read_json, write_csv
from seedlings.folds import load_folds
from seedlings.holdout import answers_of, ensure_holdout
from seedlings.images import read_image, scan_competition
from seedlings.metrics import macro_f1, micro_f1
from seedlings.model import BUNDLED
from seedlings.predict import predict_fold, predict_run, tta_probs
from seedlings.recipes import apply_override, parse_value, recipe_from_dict
from seedlings.run import Run, open_run
from seedlings.train import train_fold

# The README's ablations: the recipe with one technique switched (overrides on top of the recipe; @names depend on
# the recipe's own stages). Fold blending is the chain row against the fold-0 row; snapshot blends are graded by
# `seedlings grade --run`; a blend key's row is the recipe's whole chain blended again.
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
    "no plant mask (gravel and soil kept)": ["plant_mask=none"],
    "no mixup or cutmix": ["mixup_alpha=0", "cutmix_alpha=0"],
    "every layer group trains (no frozen groups)": ["@unfreeze"],
    "frozen groups run every epoch (no precomputed maps; crops, colour jitter)": ["@no_maps"],
    "tf_efficientnet_lite0 as the backbone": ["model=tf_efficientnet_lite0"],
    "no calibration of the blend": ["calibrate=none"],
    "the plant on black (plant_mask=green) instead of the recipe's mask": ["plant_mask=green"],
    "the last stage's schedule a fifth shorter (the time the chain would save)": ["@shorter"],
}  # fmt: skip
BLEND_KEYS = {"calibrate"}  # change only how the chain blends its folds: graded on the recipe's own chain


def row(what: str, y: np.ndarray, pred: np.ndarray, seconds: float, how: str) -> dict:
    return {
        "what": what,
        "micro_f1": micro_f1(y, pred),
        "macro_f1": macro_f1(y, pred),
        "seconds": round(seconds, 1),
        "how": how,
    }


# the bar every recipe is held to, whatever its backbone: the linear probe on Lite0's ImageNet features of the
# unmasked photos, as in every compare table since the first (a recipe's own backbone gets a probe row of its own)
PROBE_MODEL = "tf_efficientnet_lite0"


def probe_recipe(recipe: Recipe, model: str) -> Recipe:
    """The baseline probe's recipe: `model` on the unmasked photos (bundled weights when the package has them)."""
    pretrained = "bundled" if model in BUNDLED else recipe.pretrained
    return dataclasses.replace(recipe, model=model, plant_mask="none", pretrained=pretrained)


def probe_rows(held: Run, sizes: tuple[int, ...], model: str) -> list[dict]:
    """The baseline probe at each size, and, when the recipe's backbone or input differs from it, the probe on the
    recipe's own features at the largest size (what the fine-tune adds over its own frozen backbone)."""
    baseline = dataclasses.replace(held, recipe=probe_recipe(held.recipe, model))
    rows = [probe_row(baseline, s) for s in dict.fromkeys(sizes)]
    if baseline.recipe != held.recipe:
        rows.append(probe_row(held, max(sizes)))
    return rows


def probe_row(run: Run, size: int) -> dict:
    """The linear probe trained on every labelled image of the split (mirror-averaged features, C by CV)."""
    start = time.perf_counter()
    probe = probe_run(run, size)
    ctx = prepare_fold(probe, 0)  # every image is used: fold 0's split only orders them
    every = np.sort(np.concatenate([ctx.train_idx, ctx.val_idx]))
    x = mirror_features(ctx, size, every)
    fit = fit_logistic(x, ctx.labels[every], len(ctx.comp.classes), seed=run.recipe.seed)
    test = load_cache(ctx.comp, "test", probe.recipe.cache_size, mask=probe.recipe.plant_mask)
    pred = fit.logits(mirror_features(ctx, size, np.arange(len(test.files)), test.images)).argmax(1)
    y = answers_of(run.data, test.files, ctx.comp.classes)
    masked = f" with plant_mask={run.recipe.plant_mask}" if run.recipe.plant_mask != "none" else ""
    return row(
        f"linear probe, {run.recipe.model} features{masked} at {size} px", y, pred, time.perf_counter() - start,
        f"logistic regression, C={fit.c:g} by {3}-fold CV, image + mirror features",
    )  # fmt: skip


def fold_row(run: Run, label: str) -> dict:
    """Fold 0 of the recipe: trained, predicted with its TTA, and its last model graded alone on the held-out images."""
    start = time.perf_counter()
    train_fold(run, 0)
    test = predict_fold(run, 0)[-1]
    probs = test.load("test")
    y = answers_of(run.data, probs.files, probs.classes)
    return row(f"{label}: fold 0 alone", y, probs.values.argmax(1), time.perf_counter() - start, test.name)


def predict_row(run: Run, label: str) -> dict:
    """Fold 0's trained model of `run`, predicted on the held-out images with the recipe's (other) TTA settings."""
    start = time.perf_counter()
    recipe = run.recipe
    ctx = prepare_fold(run, 0)
    last = run.members(0)[-1]
    ctx.model.load_state_dict(last.state_dict(ctx.device))
    test = load_cache(ctx.comp, "test", recipe.cache_size, mask=recipe.plant_mask)
    probs = tta_probs(ctx, test.images, np.arange(len(test.files)), recipe.eval_size, recipe.tta)
    y = answers_of(run.data, test.files, ctx.comp.classes)
    seconds = time.perf_counter() - start + json_seconds(run.fold_dir(0) / "done.json")
    how = f"{last.name}, {recipe.tta}, fold 0 of the recipe"
    return row(f"{label}: fold 0 alone", y, probs.argmax(1), seconds, how)


def json_seconds(path: Path) -> float:
    return float(read_json(path, "record", "delete it and run again", ("seconds",))["seconds"])


def chain_row(run: Run, label: str) -> dict:
    """The whole chain (make submit) on the split: every fold the recipe trains, predicted, blended, written."""
    classes = run.comp.classes
    start = time.perf_counter()
    csv = submit(run)
    seconds = time.perf_counter() - start
    sub = pd.read_csv(csv)
    y = answers_of(run.data, sub.file.tolist(), classes)
    pred = np.array([classes.index(s) for s in sub.species])
    how = f"{len(run.folds())} fold model(s) of {run.n_folds}, blended"
    return row(f"{label}: whole chain (make submit)", y, pred, seconds, how)


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
        elif item == "@unfreeze":  # nothing frozen is left to precompute
            for s in unfrozen:
                s.update(frozen_groups=0, precompute=False)
        elif item == "@shorter":  # whole epochs: a schedule of 20 becomes 16
            for last in unfrozen[-1:]:
                last["cycle_len"] = round(last["cycle_len"] * 0.8)  # 1 stays 1: not run
                last["warmup"] = min(last["warmup"], last["cycle_len"] / 2)
        elif item == "@no_maps":
            for s in unfrozen:
                s["precompute"] = False
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
    run: Run,
    fraction: float = 0.2,
    seed: int = 0,
    ablations: bool = False,
    sizes: tuple[int, ...] = (),
    probes_only: bool = False,
    baseline: tuple[str, Recipe | None] = ("", None),
    probe_model: str = PROBE_MODEL,
) -> pd.DataFrame:
    """The table (also runs/<run>-holdout/compare.csv): the baseline probe (`probe_model`) at the data's own size
    and at 224 px, the recipe's own backbone's probe, one fold of the recipe, the whole chain, and with `ablations`
    fold 0 once per technique switched. baseline: (name, recipe) of another recipe (the one this replaced, say)
    whose fold and chain rows join the table, trained on the same split."""
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
    if ablations:  # fold 0 alone for each: the chain's cost would be the folds' count times this
        rows += [ablation_row(held, i, name, overrides) for i, (name, overrides) in enumerate(ABLATIONS.items())]
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


def ablation_row(held: Run, i: int, name: str, overrides: list[str]) -> dict:
    """Fold 0 with one technique switched: predicted from the recipe's own fold 0 when only prediction keys change."""
    changed = variant(held.recipe, overrides)
    if changed == held.recipe:
        return {"what": f"ablation: {name}", "how": "same as the recipe here: not run"}
    keys = {k for k, v in recipe_dict(changed).items() if recipe_dict(held.recipe)[k] != v}
    if keys <= BLEND_KEYS:
        return reblend_row(dataclasses.replace(held, recipe=changed), f"ablation: {name}")
    if keys <= set(PREDICTION_KEYS):
        return predict_row(dataclasses.replace(held, recipe=changed), f"ablation: {name}")
    ablated = open_run(f"{held.name}-ablation{i}", held.data, changed, held.n_folds, held.fold_seed)
    return fold_row(ablated, f"ablation: {name}")


def reblend_row(run: Run, label: str) -> dict:
    """The whole chain of `run`'s folds (trained and predicted by the recipe's chain row) blended again with `run`'s
    blend keys, without writing a submission; its seconds are the chain's, from the recipe's submission record."""
    start = time.perf_counter()
    members = predict_run(run)  # every member is there already: loaded, not predicted
    folds = load_folds(run.data, run.n_folds, run.fold_seed)
    _, test, _, _, _ = blend_members(run.recipe, members, folds, run.comp.classes)
    y = answers_of(run.data, test.files, test.classes)
    chain = paths.submissions_dir() / f"{run.name}.json"
    record = read_json(chain, "record", "make compare again", ("seconds",))["seconds"]
    seconds = sum(record.values()) + time.perf_counter() - start - record.get("blend", 0.0)
    how = f"{len(run.folds())} fold model(s) of {run.n_folds}, blended again"
    return row(f"{label}: whole chain (make submit)", y, test.values.argmax(1), seconds, how)


def finish(rows: list[dict], run: Run) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    out = write_csv(run.dir / "compare.csv", table, float_format="%.4f")
    print(format_compare(table, run.data))
    print(f"{out}")
    return table


def fold_seconds(run: Run, fold: int) -> float:
    """Training (done.json) plus prediction seconds of one fold of a run."""
    predict = sum(json_seconds(m.meta_path) for m in run.members(fold))
    return json_seconds(run.fold_dir(fold) / "done.json") + predict


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
