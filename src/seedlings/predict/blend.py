"""Blends: folds x snapshots (x runs), equal weights or weights fitted on out-of-fold log loss, and the blend's
calibration (a temperature and class biases fitted on out-of-fold log loss)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from seedlings.errors import UserError
from seedlings.metrics import PROB_FLOOR, log_loss, micro_f1
from seedlings.predict.members import Member, run_members
from seedlings.recipe.schema import Recipe
from seedlings.run import Run
from seedlings.storage import Probs


@dataclass
class Blendable:
    """One snapshot type of one run across all folds: out-of-fold probabilities for every training image, and test
    probabilities averaged over the folds."""

    name: str  # "<run>/<snapshot>"
    oof: np.ndarray  # (n_train, n_classes), rows in `files` order
    test: np.ndarray  # (n_test, n_classes)


def assemble(members: list[Member]) -> tuple[list[str], list[Blendable]]:
    """Group members by (run, snapshot); each group needs every fold, so its OOF covers all training images.
    Returns the out-of-fold files (sorted) and one Blendable per complete group. The full fit's members have no
    out-of-fold probabilities: blend_full adds them."""
    members = [m for m in members if not m.full]
    check_same_folds(members)
    oof = {m: m.load("oof") for m in members}
    per_fold = {m.fold: oof[m].files for m in members}  # every member of a fold predicts the same images
    files = sorted(f for fold_files in per_fold.values() for f in fold_files)
    row = {f: i for i, f in enumerate(files)}
    folds = sorted(per_fold)
    groups: dict[tuple[str, str], dict[int, Member]] = {}
    for m in members:
        groups.setdefault((m.run, m.name), {})[m.fold] = m
    out = []
    for (run, name), by_fold in sorted(groups.items()):
        if sorted(by_fold) != folds:
            continue  # a snapshot some folds lack (another cycle count) cannot give full OOF
        blended, test = None, []
        for m in by_fold.values():
            p = oof[m]
            blended = np.zeros((len(files), p.values.shape[1])) if blended is None else blended
            blended[[row[f] for f in p.files]] = p.values
            test.append(m.load("test").values)
        out.append(Blendable(f"{run}/{name}", blended, np.mean(test, 0)))
    if not out:
        raise UserError("no snapshot is present in every fold: nothing to blend")
    return files, out


def check_same_folds(members: list[Member]) -> None:
    """Runs blended together must have trained the same folds: a run missing a fold another has gives no
    out-of-fold row for that fold's images, and would otherwise drop out of the blend without a word."""
    folds_of: dict[str, set[int]] = {}
    for m in members:
        folds_of.setdefault(m.run, set()).add(m.fold)
    if len({frozenset(f) for f in folds_of.values()}) > 1:
        listed = "; ".join(f"{run}: folds {', '.join(map(str, sorted(f)))}" for run, f in folds_of.items())
        raise UserError(f"--runs: the runs blended did not train the same folds ({listed}); train the missing folds "
                        "(make train RUN=<run> FOLD=<k>) or blend runs of the same train_folds")  # fmt: skip


def fit_weights(oofs: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the blend's out-of-fold log loss (softmax parametrisation)."""
    stack = np.stack(oofs)

    def loss(z: np.ndarray) -> float:
        w = np.exp(z - z.max())
        return log_loss(np.tensordot(w / w.sum(), stack, 1), labels)

    res = minimize(
        loss,
        np.zeros(len(oofs)),
        method="Powell",  # derivative-free; the softmax keeps the weights non-negative and summing to 1
        options={"xtol": 1e-4, "ftol": 1e-7, "maxiter": 2000},
    )
    w = np.exp(res.x - res.x.max())
    return w / w.sum()


def score(probs: np.ndarray, labels: np.ndarray) -> dict:
    return {"micro_f1": micro_f1(labels, probs.argmax(1)), "log_loss": log_loss(probs.astype(np.float64), labels)}


def blend(parts: list[Blendable], labels: np.ndarray, weights: str = "fit") -> tuple[np.ndarray, np.ndarray, dict]:
    """(oof, test, table): weighted sums of the parts, and a table of each part's and the blend's OOF scores."""
    w = (
        fit_weights([p.oof for p in parts], labels)
        if weights == "fit" and len(parts) > 1
        else np.full(len(parts), 1 / len(parts))
    )
    oof = np.tensordot(w, np.stack([p.oof for p in parts]), 1)
    test = np.tensordot(w, np.stack([p.test for p in parts]), 1)
    table = {p.name: {**score(p.oof, labels), "weight": float(wi)} for p, wi in zip(parts, w)}
    table["blend"] = {**score(oof, labels), "weight": 1.0}
    return oof, test, table


# the table's rows that are no part (run/snapshot) of the blend: summaries and the full fit
UNCALIBRATED = "blend, uncalibrated"
LEFT_OUT = "blend, calibrated (left out)"
FULL_FIT = "full fit (every training image)"
NOT_PARTS = ("blend", UNCALIBRATED, LEFT_OUT, FULL_FIT)


def full_fit_weights(full: list[Member], table: dict) -> np.ndarray:
    """The full fit's snapshots weighted as the blend weighted the folds' same snapshots, summing to 1."""
    weights = np.array([table.get(f"{m.run}/{m.name}", {}).get("weight", 0.0) for m in full]) + 1e-12
    return weights / weights.sum()


def blend_full(members: list[Member], test: np.ndarray, table: dict) -> np.ndarray:
    """The fold blend's test probabilities with the full fit's (its snapshots weighted as the blend weighted the
    folds' same snapshots) as one more model: weight 1/(k + 1) beside k fold models. Adds its row to `table`."""
    full = [m for m in members if m.full]
    if not full:
        return test
    full_test = np.tensordot(full_fit_weights(full, table), np.stack([m.load("test").values for m in full]), 1)
    k = len({(m.run, m.fold) for m in members if not m.full})
    table[FULL_FIT] = {
        "micro_f1": float("nan"),
        "log_loss": float("nan"),
        "weight": 1 / (k + 1),
    }
    return (k * test + full_test) / (k + 1)


@dataclass
class Calibration:
    """Probabilities p become softmax(temperature * log p + bias): one temperature, one bias per class."""

    temperature: float
    bias: np.ndarray  # (n_classes,)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        z = self.temperature * np.log(np.clip(probs, PROB_FLOOR, None)) + self.bias
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def as_dict(self, classes: list[str]) -> dict:
        return {"temperature": self.temperature, "bias": dict(zip(classes, map(float, self.bias)))}


CALIBRATION_L2 = 1e-3  # a little pull of the biases towards 0, so that a class with few images cannot run away


def fit_calibration(probs: np.ndarray, labels: np.ndarray) -> Calibration:
    """The temperature and class biases that minimise the log loss of `probs` against `labels` (L-BFGS with the
    exact gradient; the temperature is fitted on a log scale, so it stays positive)."""
    logp = np.log(np.clip(probs, PROB_FLOOR, None))
    onehot = np.eye(probs.shape[1])[labels]

    def loss_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        t, b = np.exp(x[0]), x[1:]
        z = t * logp + b
        z = z - z.max(1, keepdims=True)
        q = np.exp(z)
        total = q.sum(1, keepdims=True)
        q /= total
        loss = -(z * onehot).sum(1).mean() + np.log(total).mean() + CALIBRATION_L2 * (b**2).sum()
        d = (q - onehot) / len(labels)  # d loss / d z
        grad = np.concatenate([[t * (d * logp).sum()], d.sum(0) + 2 * CALIBRATION_L2 * b])
        return float(loss), grad

    res = minimize(loss_and_grad, np.zeros(1 + probs.shape[1]), jac=True, method="L-BFGS-B")
    return Calibration(float(np.exp(res.x[0])), res.x[1:])


def calibrate(
    oof: np.ndarray, test: np.ndarray, labels: np.ndarray, fold_of: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Calibration]:
    """(oof, test, calibration): the calibration fitted on every out-of-fold row is applied to the test rows; each
    fold's out-of-fold rows are calibrated by a fit on the other folds' rows only, so the calibrated OOF score is
    an honest estimate, not a score on the images the calibration was fitted to. With a single fold there are no
    other rows: its OOF rows are calibrated in-sample (optimistic; the caller says so)."""
    everything = fit_calibration(oof, labels)
    folds = np.unique(fold_of)
    if len(folds) == 1:
        return everything.apply(oof), everything.apply(test), everything
    out = oof.copy()
    for fold in folds:
        rows = fold_of == fold
        out[rows] = fit_calibration(oof[~rows], labels[~rows]).apply(oof[rows])
    return out, everything.apply(test), everything


def calibrate_blend(
    oof: np.ndarray, test: np.ndarray, labels: np.ndarray, fold_of: np.ndarray, table: dict, classes: list[str]
) -> tuple[np.ndarray, np.ndarray, dict]:
    """`calibrate` for the chain, kept only when it lowers the blend's cross-fitted out-of-fold log loss (on a few
    images per class the fit chases noise: the demo's 87 got worse; with one fold there is nothing to check it on).
    The table gains the calibrated blend's row; when kept, it is the "blend" row and the uncalibrated one stays as
    "blend, uncalibrated". Returns the chain's (oof, test) and what was fitted, with `used`."""
    calibrated_oof, calibrated_test, calibration = calibrate(oof, test, labels, fold_of)
    row = {**score(calibrated_oof, labels), "weight": 1.0}
    several = len(np.unique(fold_of)) > 1  # one fold: its OOF rows are the fit's own, nothing to check it on
    used = several and row["log_loss"] < table["blend"]["log_loss"]
    how = "each fold's rows by a fit on the other folds" if several else "in-sample, one fold"
    before, after = table["blend"]["log_loss"], row["log_loss"]
    print(f"blend calibration: temperature {calibration.temperature:.3f}, class biases; OOF log loss {before:.4f}"
          f" -> {after:.4f} ({how}): {'used' if used else 'left out'}")  # fmt: skip
    info = {**calibration.as_dict(classes), "used": used}
    if not used:
        table[LEFT_OUT] = {**row, "weight": 0.0}
        return oof, test, info
    table[UNCALIBRATED] = table.pop("blend")
    table["blend"] = row
    return calibrated_oof, calibrated_test, info


def fold_of_files(folds: pd.DataFrame, files: list[str]) -> np.ndarray:
    """The fold of each file in `files` (the rows of a blend), from the folds table."""
    return folds.set_index("file").fold.loc[files].to_numpy()


def format_table(table: dict) -> str:
    width = max(len(k) for k in table)
    lines = [f"{'member':<{width}}  {'OOF micro-F1':>12}  {'OOF log loss':>12}  {'weight':>6}"]
    lines += [
        f"{k:<{width}}  {v['micro_f1']:12.4f}  {v['log_loss']:12.4f}  {v['weight']:6.3f}" for k, v in table.items()
    ]
    return "\n".join(lines)


@dataclass
class ChainBlend:
    """A chain's blend of its predicted members, and how it scored out of fold."""

    oof: Probs  # the blend's out-of-fold probabilities, one row per training image of the blended folds
    test: Probs
    labels: np.ndarray  # the true class of each out-of-fold row
    table: dict  # each blended part's and the blend's OOF micro-F1, log loss and weight; "blend" is the submitted one
    calibration: dict | None  # with calibrate: bias, the fitted temperature and biases, and whether they were used

    @property
    def score(self) -> dict:
        return self.table["blend"]

    @property
    def calibrated(self) -> bool:
        return bool(self.calibration and self.calibration["used"])


def blend_members(
    recipe: Recipe, members: list[Member], folds: pd.DataFrame, classes: list[str], weights: str = "fit"
) -> ChainBlend:
    """The chain's blend of predicted members: snapshots weighted by OOF log loss, the full fit joined, and with
    `calibrate: bias` the blend calibrated on its cross-fitted OOF probabilities when that lowers their log loss."""
    files, parts = assemble(members)
    label_of = dict(zip(folds.file, folds.species))
    labels = np.array([classes.index(label_of[f]) for f in files])
    oof, test, table = blend(parts, labels, weights)
    test = blend_full(members, test, table)
    calibration = None
    if recipe.calibrate == "bias":
        oof, test, calibration = calibrate_blend(oof, test, labels, fold_of_files(folds, files), table, classes)
    test_files = members[0].load("test").files
    return ChainBlend(Probs(oof, files, classes), Probs(test, test_files, classes), labels, table, calibration)


def oof_summary(run: Run, folds: pd.DataFrame) -> list[tuple[str, float, float]]:
    """(what, OOF micro-F1, OOF log loss) from a run's saved probabilities: each fold's last model without and with
    TTA, then over all folds the last snapshot alone, and the folds x snapshots blend (equal weights); with
    `calibrate: bias` and several folds, that blend calibrated, cross-fitted as the chain does it."""
    label_of = dict(zip(folds.file, folds.species))
    members = [m for m in run_members(run) if not m.full]  # the full fit has no out-of-fold probabilities
    lasts = list({m.fold: m for m in members}.values())  # each fold's last member: its final model
    if not lasts or not lasts[0].probs_path("oof-notta").exists():
        raise UserError(f"{run.dir / 'probs'}: no predictions with and without TTA (make predict RUN={run.name})")
    rows = []
    for m in lasts:
        for split, what in (("oof-notta", "no TTA"), ("oof", "TTA")):
            p = m.load(split)
            y = np.array([p.classes.index(label_of[f]) for f in p.files])
            rows.append((f"{m.label} ({what})", *score(p.values, y).values()))
    files, parts = assemble(members)
    classes = lasts[0].load("oof").classes
    y = np.array([classes.index(label_of[f]) for f in files])
    last = next(p.oof for p in parts if p.name == f"{run.name}/{lasts[0].name}")
    rows.append((f"all folds, {lasts[0].name} only (TTA)", *score(last, y).values()))
    oof, test, table = blend(parts, y, "equal")
    what = f"all folds x {len(parts)} snapshots, equal blend (TTA)"
    rows.append((what, *[table["blend"][k] for k in ("micro_f1", "log_loss")]))
    fold_ids = fold_of_files(folds, files)
    if run.recipe.calibrate == "bias" and len(np.unique(fold_ids)) > 1:  # what the chain's calibration would do
        calibrated, _, _ = calibrate(oof, test, y, fold_ids)
        rows.append((f"{what}, calibrated (each fold by a fit on the others)", *score(calibrated, y).values()))
    return rows


def print_oof_summary(run: Run) -> None:
    """`make evaluate`: oof_summary as a table."""
    rows = oof_summary(run, run.fold_table)
    width = max(len(what) for what, _, _ in rows)
    print(f"{'out-of-fold':<{width}}  {'micro-F1':>8}  {'log loss':>8}")
    for what, f1, loss in rows:
        print(f"{what:<{width}}  {f1:8.4f}  {loss:8.4f}")
