"""The ablations of `make compare ABLATIONS=1`: the recipe's fold 0 once per technique switched, graded on the same
held-out images. The switches are data, a file of row labels and the recipe keys each changes, beside the recipe
(configs/cpu-ablations.yaml); a switch of prediction keys only is predicted from the recipe's own fold 0, a blend
key's row is the recipe's whole chain blended again."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from seedlings import paths
from seedlings.chain.submit import evaluate_chain
from seedlings.data.cache import load_cache
from seedlings.errors import UserError
from seedlings.lab.holdout import answers_of, fold_row, graded_row, json_seconds
from seedlings.predict.infer import tta_probs
from seedlings.predict.members import run_members
from seedlings.recipe.load import read_yaml, with_changes
from seedlings.recipe.schema import BLEND_KEYS, PREDICTION_KEYS, recipe_dict
from seedlings.run import Run, open_run
from seedlings.storage import read_json
from seedlings.train.fold import prepare_fold
from seedlings.train.predictor import Predictor


def ablations_path(config: str | Path) -> Path:
    """A recipe's ablations live beside it: configs/cpu.yaml's in configs/cpu-ablations.yaml."""
    config = Path(config)
    return config.with_name(f"{config.stem}-ablations.yaml")


def load_ablations(path: str | Path) -> dict[str, dict[str, Any]]:
    """{row label: {dotted recipe key: value}} from an ablations file; each switch is checked when it is applied."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no ablations for this recipe; write one (a row label, then the recipe keys it "
                        "changes: configs/cpu-ablations.yaml shows how), or give --ablations-file")  # fmt: skip
    table = read_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(table, dict) or not table or not all(isinstance(v, dict) and v for v in table.values()):
        raise UserError(f"{path}: an ablations file maps each row's label to the recipe keys it changes")
    return {str(label): changes for label, changes in table.items()}


def ablation_rows(held: Run, ablations: dict[str, dict[str, Any]]) -> list[dict]:
    """Fold 0 once per switch (the chain's cost would be the folds' count times this)."""
    return [ablation_row(held, i, label, changes) for i, (label, changes) in enumerate(ablations.items())]


def ablation_row(held: Run, i: int, name: str, changes: dict[str, Any]) -> dict:
    """Fold 0 with one technique switched: predicted from the recipe's own fold 0 when only prediction keys change."""
    try:
        changed = with_changes(held.recipe, changes)
    except UserError as e:
        raise UserError(f"ablation {name!r}: {e}") from None
    if changed == held.recipe:
        return {"what": f"ablation: {name}", "how": "same as the recipe here: not run"}
    keys = {k for k, v in recipe_dict(changed).items() if recipe_dict(held.recipe)[k] != v}
    if keys <= set(BLEND_KEYS):  # only how the chain blends its folds: graded on the recipe's own chain
        return reblend_row(dataclasses.replace(held, recipe=changed), f"ablation: {name}")
    if keys <= set(PREDICTION_KEYS):
        return predict_row(dataclasses.replace(held, recipe=changed), f"ablation: {name}")
    ablated = open_run(f"{held.name}-ablation{i}", held.data, changed, held.n_folds, held.fold_seed)
    return fold_row(ablated, f"ablation: {name}")


def reblend_row(run: Run, label: str) -> dict:
    """The whole chain of `run`'s folds (trained and predicted by the recipe's chain row) blended again with `run`'s
    blend keys, without writing a submission; its seconds are the chain's, from the recipe's submission record."""
    start = time.perf_counter()
    test = evaluate_chain(run).test  # every member is predicted already: loaded, not predicted again
    y = answers_of(run.data, test.files, test.classes)
    chain = run.submission_path.with_suffix(".json")
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
    predictor = Predictor(ctx, test.images, through_network=True)  # as the network predicts, maps or not
    probs = tta_probs(predictor, "test", np.arange(len(test.files)), recipe.tta)
    y = answers_of(run.data, test.files, ctx.comp.classes)
    seconds = time.perf_counter() - start + json_seconds(run.fold_dir(0) / paths.DONE)
    how = f"{last.name}, {recipe.tta}, fold 0 of the recipe"
    return graded_row(f"{label}: fold 0 alone", y, probs.argmax(1), seconds, how)
