"""The ablations of `make compare ABLATIONS=1`: the recipe's fold 0 once per technique switched, graded on the same
held-out images; a switch of prediction keys only is predicted from the recipe's own fold 0, a blend key's row is the
recipe's whole chain blended again."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from seedlings import paths
from seedlings.data.cache import load_cache
from seedlings.lab.holdout import answers_of, fold_row, graded_row, json_seconds
from seedlings.predict.infer import predict_run, tta_probs
from seedlings.predict.members import run_members
from seedlings.predict.submit import blend_members
from seedlings.recipe.load import apply_override, parse_value, recipe_from_dict
from seedlings.recipe.schema import PREDICTION_KEYS, Recipe, lrs_of, recipe_dict
from seedlings.run import Run, open_run
from seedlings.storage import read_json
from seedlings.train.fold import prepare_fold

# The ablations of docs/results.md: the recipe with one technique switched (overrides on top of the recipe; @names
# depend on the recipe's own stages). Fold blending is the chain row against the fold-0 row; snapshot blends are
# graded by `seedlings grade --run`; a blend key's row is the recipe's whole chain blended again.
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
    folds = run.fold_table
    _, test, _, _, _ = blend_members(run.recipe, members, folds, run.comp.classes)
    y = answers_of(run.data, test.files, test.classes)
    chain = paths.submissions_dir() / f"{run.name}.json"
    record = read_json(chain, "record", "make compare again", ("seconds",))["seconds"]
    seconds = sum(record.values()) + time.perf_counter() - start - record.get("blend", 0.0)
    how = f"{len(run.folds())} fold model(s) of {run.n_folds}, blended again"
    return graded_row(f"{label}: whole chain (make submit)", y, test.values.argmax(1), seconds, how)


def predict_row(run: Run, label: str) -> dict:
    """Fold 0's trained model of `run`, predicted on the held-out images with the recipe's (other) TTA settings."""
    start = time.perf_counter()
    recipe = run.recipe
    ctx = prepare_fold(run, 0)
    last = run_members(run, 0)[-1]
    ctx.model.load_state_dict(last.state_dict(ctx.device))
    test = load_cache(ctx.comp, "test", recipe.cache_size, mask=recipe.plant_mask)
    probs = tta_probs(ctx, test.images, np.arange(len(test.files)), recipe.eval_size, recipe.tta)
    y = answers_of(run.data, test.files, ctx.comp.classes)
    seconds = time.perf_counter() - start + json_seconds(run.fold_dir(0) / "done.json")
    how = f"{last.name}, {recipe.tta}, fold 0 of the recipe"
    return graded_row(f"{label}: fold 0 alone", y, probs.argmax(1), seconds, how)
