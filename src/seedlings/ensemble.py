"""Blends: folds x snapshots (x runs), equal weights or weights fitted on out-of-fold log loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from sklearn.metrics import f1_score, log_loss

from seedlings.errors import UserError
from seedlings.predict import Member


@dataclass
class Blendable:
    """One snapshot type of one run across all folds: out-of-fold probabilities for every training image, and test
    probabilities averaged over the folds."""

    name: str  # "<run>/<snapshot>"
    oof: np.ndarray  # (n_train, n_classes), rows in `files` order
    test: np.ndarray  # (n_test, n_classes)


def oof_order(members: list[Member]) -> tuple[list[str], dict[int, list[str]]]:
    """All out-of-fold files (sorted), and each fold's file order as predict wrote it."""
    per_fold = {}
    for m in members:
        if m.fold not in per_fold:
            per_fold[m.fold] = pd.read_csv(f"{m.stem}.oof.csv", usecols=["file"]).file.tolist()
    return sorted(f for files in per_fold.values() for f in files), per_fold


def assemble(members: list[Member]) -> tuple[list[str], list[Blendable]]:
    """Group members by (run, snapshot); each group needs every fold, so its OOF covers all training images."""
    files, per_fold = oof_order(members)
    row = {f: i for i, f in enumerate(files)}
    folds = sorted(per_fold)
    groups: dict[tuple[str, str], dict[int, Member]] = {}
    for m in members:
        groups.setdefault((m.run, m.name), {})[m.fold] = m
    out = []
    for (run, name), by_fold in sorted(groups.items()):
        if sorted(by_fold) != folds:
            continue  # a snapshot some folds lack (another cycle count) cannot give full OOF
        oof, test = None, []
        for fold, m in by_fold.items():
            p = m.load("oof")
            oof = np.zeros((len(files), p.shape[1])) if oof is None else oof
            oof[[row[f] for f in per_fold[fold]]] = p
            test.append(m.load("test"))
        out.append(Blendable(f"{run}/{name}", oof, np.mean(test, 0)))
    if not out:
        raise UserError("no snapshot is present in every fold: nothing to blend")
    return files, out


def fit_weights(oofs: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the blend's out-of-fold log loss (softmax parametrisation)."""
    stack = np.stack(oofs)

    def loss(z: np.ndarray) -> float:
        w = np.exp(z - z.max())
        w /= w.sum()
        p = np.tensordot(w, stack, 1)
        return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-15, None)).mean())

    res = minimize(
        loss,
        np.zeros(len(oofs)),
        method="Powell",  # derivative-free; the softmax keeps the weights non-negative and summing to 1
        options={"xtol": 1e-4, "ftol": 1e-7, "maxiter": 2000},
    )
    w = np.exp(res.x - res.x.max())
    return w / w.sum()


def score(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    p = np.clip(probs.astype(np.float64), 1e-15, 1)
    p /= p.sum(1, keepdims=True)  # float32 sums drift from 1 by ~1e-7, which sklearn warns about
    return {
        "micro_f1": float(f1_score(labels, probs.argmax(1), average="micro")),
        "log_loss": float(log_loss(labels, p, labels=list(range(n_classes)))),
    }


def blend(parts: list[Blendable], labels: np.ndarray, weights: str = "fit") -> tuple[np.ndarray, np.ndarray, dict]:
    """(oof, test, table): weighted sums of the parts, and a table of each part's and the blend's OOF scores."""
    n_classes = parts[0].oof.shape[1]
    w = (
        fit_weights([p.oof for p in parts], labels)
        if weights == "fit" and len(parts) > 1
        else np.full(len(parts), 1 / len(parts))
    )
    oof = np.tensordot(w, np.stack([p.oof for p in parts]), 1)
    test = np.tensordot(w, np.stack([p.test for p in parts]), 1)
    table = {p.name: {**score(p.oof, labels, n_classes), "weight": float(wi)} for p, wi in zip(parts, w)}
    table["blend"] = {**score(oof, labels, n_classes), "weight": 1.0}
    return oof, test, table


def format_table(table: dict) -> str:
    width = max(len(k) for k in table)
    lines = [f"{'member':<{width}}  {'OOF micro-F1':>12}  {'OOF log loss':>12}  {'weight':>6}"]
    lines += [
        f"{k:<{width}}  {v['micro_f1']:12.4f}  {v['log_loss']:12.4f}  {v['weight']:6.3f}" for k, v in table.items()
    ]
    return "\n".join(lines)


def grade_members(run: str, answers: str) -> dict[str, float]:
    """Held-out micro-F1 of every saved test prediction of a run: each fold's snapshots, each snapshot averaged over
    the folds, and everything averaged (for competitions made by `seedlings holdout`, whose answers are known)."""
    import re

    from seedlings.predict import probs_dir

    truth = pd.read_csv(answers).set_index("file").species
    found = sorted(probs_dir(run).glob("fold*-*.test.npy"))
    if not found:
        raise UserError(f"{probs_dir(run)}: no test probabilities (make predict RUN={run})")
    classes = pd.read_csv(str(found[0]).replace(".npy", ".csv"), nrows=0).columns[1:].tolist()
    files = pd.read_csv(str(found[0]).replace(".npy", ".csv"), usecols=["file"]).file
    y = np.array([classes.index(s) for s in truth.loc[files]])
    probs = {re.sub(r"\.test\.npy$", "", p.name): np.load(p) for p in found}
    out = {name: float(np.mean(p.argmax(1) == y)) for name, p in probs.items()}
    snapshots = sorted({n.split("-", 1)[1] for n in probs})
    for snap in snapshots:
        out[f"all folds, {snap}"] = float(
            np.mean(np.mean([p for n, p in probs.items() if n.endswith(snap)], 0).argmax(1) == y)
        )
    out["all folds x snapshots"] = float(np.mean(np.mean(list(probs.values()), 0).argmax(1) == y))
    return out


def oof_summary(run: str, folds: pd.DataFrame, classes: list[str]) -> list[tuple[str, float, float]]:
    """(what, OOF micro-F1, OOF log loss) from a run's saved probabilities: each fold's last model without and with
    TTA, then over all folds the last snapshot alone, and the folds x snapshots blend (equal weights)."""
    from seedlings.predict import probs_dir

    label_of = dict(zip(folds.file, folds.species))
    rows = []

    def scored(stem: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        df = pd.read_csv(probs_dir(run) / f"{stem}.{split}.csv")
        return df[classes].to_numpy(), np.array([classes.index(label_of[f]) for f in df.file])

    lasts = sorted(p.name.split(".")[0] for p in probs_dir(run).glob("fold*.oof-notta.npy"))
    if not lasts:
        raise UserError(f"{probs_dir(run)}: no predictions with and without TTA (make predict RUN={run})")
    for stem in lasts:
        for split, what in (("oof-notta", "no TTA"), ("oof", "TTA")):
            p, y = scored(stem, split)
            rows.append((f"{stem} ({what})", *score(p, y, len(classes)).values()))
    members = [
        Member(run, int(stem[4:].split("-")[0]), stem.split("-", 1)[1])
        for stem in sorted(p.name.split(".")[0] for p in probs_dir(run).glob("fold*.oof.npy"))
    ]
    files, parts = assemble(members)
    y = np.array([classes.index(label_of[f]) for f in files])
    last = lasts[0].split("-", 1)[1]
    rows.append(
        (
            f"all folds, {last} only (TTA)",
            *score(next(p.oof for p in parts if p.name.endswith(last)), y, len(classes)).values(),
        )
    )
    _, _, table = blend(parts, y, "equal")
    rows.append(
        (
            f"all folds x {len(parts)} snapshots, equal blend (TTA)",
            *[table["blend"][k] for k in ("micro_f1", "log_loss")],
        )
    )
    return rows
