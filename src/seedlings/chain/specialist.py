"""A specialist: a second run whose recipe learns a few species only (its `classes`, the two grasses say), trained on
the same folds as the chain it serves. Where the chain's blend ranks exactly those species first, their share of the
probability is divided as the specialist divides it. Out of fold each fold's rows are divided by that fold's own
specialist, trained without them, so the chain's out-of-fold score stays honest."""

from __future__ import annotations

import numpy as np

from seedlings.errors import UserError
from seedlings.predict.blend import ChainBlend, score
from seedlings.predict.infer import predict_run
from seedlings.recipe.load import load_recipe
from seedlings.run import Run, open_run
from seedlings.storage import Probs
from seedlings.train.fit import train_fold


def specialist_run(run: Run) -> Run | None:
    """runs/<run>-specialist: the recipe that `specialist` names, on the run's data and folds; None without one."""
    if not run.recipe.specialist:
        return None
    recipe = load_recipe(run.recipe.specialist)
    if not recipe.classes:
        raise UserError(f"specialist: {run.recipe.specialist} sets no `classes` (the few species a specialist learns)")
    return open_run(f"{run.name}-specialist", run.data, recipe, run.n_folds, run.fold_seed)


def specialist_probs(spec: Run, folds: list[int]) -> tuple[Probs, Probs]:
    """The specialist's folds (trained when missing) predicted: (out-of-fold probabilities of every validation image,
    each fold's snapshots averaged; test probabilities, every fold's snapshots averaged)."""
    for fold in folds:
        train_fold(spec, fold)
    members = predict_run(spec, folds)
    oof = [m.load("oof") for m in members]
    by_file: dict[str, list[np.ndarray]] = {}
    for p in oof:
        for f, row in zip(p.files, p.values):
            by_file.setdefault(f, []).append(row)
    files = sorted(by_file)
    oof_values = np.array([np.mean(by_file[f], 0) for f in files])
    test = [m.load("test") for m in members]
    return Probs(oof_values, files, oof[0].classes), Probs(np.mean([t.values for t in test], 0), test[0].files,
                                                            test[0].classes)  # fmt: skip


def divide(probs: np.ndarray, shares: np.ndarray, columns: list[int]) -> np.ndarray:
    """`probs` where its top len(columns) classes are exactly `columns`: their summed probability divided as `shares`
    (rows in the same order, columns in `columns`' order) divides it; other rows as they were."""
    top = np.argsort(-probs, 1, kind="stable")[:, : len(columns)]
    chosen = np.array([set(row) == set(columns) for row in top], dtype=bool)
    out = probs.copy()
    out[np.ix_(chosen, columns)] = probs[np.ix_(chosen, columns)].sum(1, keepdims=True) * shares[chosen]
    return out


def with_specialist(chain: ChainBlend, spec: Run, folds: list[int]) -> ChainBlend:
    """The chain's blend with the specialist's division of its species; the table keeps the blend before it."""
    oof_s, test_s = specialist_probs(spec, folds)
    columns = [chain.oof.classes.index(c) for c in oof_s.classes]
    row = {f: i for i, f in enumerate(oof_s.files)}
    missing = [f for f in chain.oof.files if f not in row]
    if missing:
        raise UserError(f"{spec.dir}: the specialist predicted no {missing[0]} (its folds are not the chain's)")
    oof = divide(chain.oof.values, oof_s.values[[row[f] for f in chain.oof.files]], columns)
    test_row = {f: i for i, f in enumerate(test_s.files)}
    test = divide(chain.test.values, test_s.values[[test_row[f] for f in chain.test.files]], columns)
    table = {**{("blend, before the specialist" if k == "blend" else k): v for k, v in chain.table.items()},
             "blend": {**score(oof, chain.labels), "weight": 1.0}}  # fmt: skip
    return ChainBlend(Probs(oof, chain.oof.files, chain.oof.classes), Probs(test, chain.test.files, chain.test.classes),
                      chain.labels, table, chain.calibration)  # fmt: skip
