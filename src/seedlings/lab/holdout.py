"""Held-out splits of a labelled competition (a test set whose answers are known, as MLE-bench does), and grading
against those answers: a submission, every member of a run, a run's fold 0 alone, or its whole chain."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from seedlings import paths
from seedlings.chain.submit import submit
from seedlings.data.competition import scan_competition
from seedlings.data.folds import dataset_key
from seedlings.errors import UserError
from seedlings.metrics import macro_f1, micro_f1
from seedlings.predict.infer import predict_fold
from seedlings.predict.members import run_members
from seedlings.predict.submission import read_rows
from seedlings.run import Run
from seedlings.storage import read_json
from seedlings.train.fit import train_fold


def make_holdout(
    src: str | Path, out: str | Path, fraction: float = 0.2, seed: int = 0, stratified: bool = True
) -> Path:
    """A competition folder whose test set is a share of src's labelled images (answers.csv holds their labels, for
    `seedlings grade`), as MLE-bench does: stratified by species, or (stratified=False) MLE-bench's own split, a plain
    train_test_split of the labelled images in species-then-name order. Images are symbolic links: nothing is
    copied."""
    src, out = Path(src).resolve(), Path(out)
    if not 0 < fraction < 1:
        raise UserError(f"--fraction: must be in (0, 1), got {fraction}")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed: must be in [0, {2**32 - 1}], got {seed}")
    if out.exists():
        raise UserError(f"{out}: already exists (remove it first)")
    comp = scan_competition(src, need_test=False)
    check_split(comp, fraction, stratified)
    keep, held = train_test_split(
        range(len(comp.train_files)), test_size=fraction, random_state=seed,
        stratify=comp.train_labels if stratified else None,
    )  # fmt: skip
    trained = {comp.train_labels[i] for i in keep}
    gone = [c for k, c in enumerate(comp.classes) if k not in trained]
    if gone:  # an unstratified split can hold a small species out whole: the chain would never see it
        raise UserError(f"{src / 'train' / gone[0]}: every image of {gone[0]} falls in the held-out share of this "
                        f"split (fraction {fraction:g}, seed {seed}), so no model would learn it; add images of it, "
                        "or split with another seed")  # fmt: skip
    names = [Path(comp.train_files[i]).name for i in held]
    if len(set(names)) != len(names):
        raise UserError(f"{src}: file names repeat across species; cannot flatten them into test/")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "test").mkdir(parents=True)
    for i in sorted(keep):
        link = tmp / "train" / comp.train_files[i]
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(comp.train_path(comp.train_files[i]))
    answers = sorted((Path(comp.train_files[i]).name, comp.classes[comp.train_labels[i]], i) for i in held)
    for name, _, i in answers:
        (tmp / "test" / name).symlink_to(comp.train_path(comp.train_files[i]))
    (tmp / "sample_submission.csv").write_text("file,species\n" + "".join(f"{n},Sugar beet\n" for n, _, _ in answers))
    (tmp / "answers.csv").write_text("file,species\n" + "".join(f"{n},{s}\n" for n, s, _ in answers))
    source = {"data": str(src), "dataset_key": dataset_key(comp), "fraction": fraction, "seed": seed,
              "stratified": stratified}  # fmt: skip
    (tmp / "SOURCE.json").write_text(json.dumps(source, indent=1))
    tmp.rename(out)
    return out


def check_split(comp, fraction: float, stratified: bool) -> None:
    """Refuse, naming the flag or the species, a split that leaves nothing to train on or to grade, or (stratified) a
    species too small to be in both halves, before scikit-learn would raise."""
    n, n_classes = len(comp.train_files), len(comp.classes)
    n_test = math.ceil(fraction * n)
    least = n_classes if stratified else 1
    if n_test < least or n - n_test < least:
        raise UserError(f"--fraction {fraction:g}: holds out {n_test} of {n} labelled images, leaving {n - n_test} to "
                        f"train on; {'each half needs one of each of the ' if stratified else 'each half needs '}"
                        f"{least} {'species' if stratified else 'image'}")  # fmt: skip
    if stratified:
        counts = np.bincount(comp.train_labels, minlength=n_classes)
        small = [c for c, k in zip(comp.classes, counts, strict=True) if k < 2]
        if small:
            raise UserError(f"{comp.root / 'train' / small[0]}: {counts[comp.classes.index(small[0])]} image(s); a "
                            "stratified held-out split needs 2 of each species")  # fmt: skip


def check_holdout_source(out: Path, src: str | Path) -> None:
    """A held-out split made earlier must still be of `src`'s labelled images (names and sizes)."""
    meta = out / "SOURCE.json"
    if not meta.exists():
        return  # made before SOURCE.json was written
    made = json.loads(meta.read_text())["dataset_key"]
    if made != dataset_key(scan_competition(src, need_test=False)):
        raise UserError(f"{out}: made from other images than {src} holds now; delete it to split the data again")


def holdout_dir(data: str | Path, fraction: float, seed: int, stratified: bool = True) -> Path:
    kind = "holdout" if stratified else "split"  # data/<data>-split-f14-s0: MLE-bench's own
    return paths.root() / "data" / f"{Path(data).resolve().name}-{kind}-f{round(fraction * 100)}-s{seed}"


def ensure_holdout(data: str | Path, fraction: float, seed: int, stratified: bool = True) -> Path:
    out = holdout_dir(data, fraction, seed, stratified)
    if out.exists():
        check_holdout_source(out, data)
        return out
    return make_holdout(data, out, fraction, seed, stratified)


def answers_of(holdout: Path, files: list[str], classes: list[str]) -> np.ndarray:
    truth = pd.read_csv(holdout / "answers.csv").set_index("file").species
    return np.array([classes.index(truth[f]) for f in files])


def grade(submission: str | Path, answers: str | Path) -> float:
    """Micro-F1 (= accuracy) of a submission against a file,species CSV of the true labels; either file malformed
    (a file listed twice, a row of other than two fields, empty, not UTF-8 text) exits 2 naming it and the line."""
    predicted, truth = read_labels(Path(submission)), read_labels(Path(answers))
    missing = [f for f in truth if f not in predicted]
    if missing:
        raise UserError(f"{submission}: {len(missing)} files of {answers} have no prediction, e.g. {missing[0]}")
    extra = [f for f in predicted if f not in truth]
    if extra:
        raise UserError(f"{submission}: {len(extra)} files that {answers} does not list, e.g. {extra[0]}")
    return micro_f1([truth[f] for f in truth], [predicted[f] for f in truth])


def read_labels(path: Path) -> dict[str, str]:
    """{file: species} of a file,species CSV, every row checked."""
    header, rows = read_rows(path)
    if [h.strip() for h in header] != ["file", "species"]:
        raise UserError(f"{path}: header is {','.join(header)!r}, expected 'file,species'")
    out: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        if len(row) != 2 or not all(row):
            raise UserError(f"{path}: line {i}: {len(row)} fields{' (one empty)' if len(row) == 2 else ''}, "
                            "expected file,species")  # fmt: skip
        if row[0] in out:
            raise UserError(f"{path}: line {i}: {row[0]} is listed twice")
        out[row[0]] = row[1]
    if not out:
        raise UserError(f"{path}: no rows under the header")
    return out


def grade_members(run: Run, answers: str | Path) -> dict[str, float]:
    """Held-out micro-F1 of every saved test prediction of a run: each fold's snapshots, each snapshot averaged over
    the folds, and everything averaged (for competitions made by `seedlings holdout`, whose answers are known)."""
    truth = read_labels(Path(answers))  # the same checks as a submission's grade: header, rows, duplicates
    probs = {m: m.load("test") for m in run_members(run)}
    if not probs:
        raise UserError(f"{run.dir}: no trained fold (make train RUN={run.name})")
    first = next(iter(probs.values()))
    missing = [f for f in first.files if f not in truth]
    if missing:
        raise UserError(f"{answers}: {len(missing)} of the {len(first.files)} test images of run {run.name!r} have no "
                        f"label, e.g. {missing[0]} (the answers of another split?)")  # fmt: skip
    unknown = sorted({truth[f] for f in first.files} - set(first.classes))
    if unknown:
        raise UserError(f"{answers}: species {unknown[0]!r} is not one of run {run.name!r}'s classes")
    y = np.array([first.classes.index(truth[f]) for f in first.files])
    out = {m.label: micro_f1(y, p.values.argmax(1)) for m, p in probs.items()}
    for snap in dict.fromkeys(m.name for m in probs):
        mean = np.mean([p.values for m, p in probs.items() if m.name == snap], 0)
        out[f"all folds, {snap}"] = micro_f1(y, mean.argmax(1))
    out["all folds x snapshots"] = micro_f1(y, np.mean([p.values for p in probs.values()], 0).argmax(1))
    return out


def graded_row(what: str, y: np.ndarray, pred: np.ndarray, seconds: float, how: str) -> dict:
    """A table row graded on held-out answers: what, micro-F1, macro-F1, wall seconds, how it was made."""
    return {
        "what": what,
        "micro_f1": micro_f1(y, pred),
        "macro_f1": macro_f1(y, pred),
        "seconds": round(seconds, 1),
        "how": how,
    }


def fold_row(run: Run, label: str) -> dict:
    """Fold 0 of the recipe: trained, predicted with its TTA, and its last model graded alone on the held-out images."""
    start = time.perf_counter()
    train_fold(run, 0)
    test = predict_fold(run, 0)[-1]
    probs = test.load("test")
    y = answers_of(run.data, probs.files, probs.classes)
    return graded_row(f"{label}: fold 0 alone", y, probs.values.argmax(1), time.perf_counter() - start, test.name)


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
    return graded_row(f"{label}: whole chain (make submit)", y, pred, seconds, how)


def json_seconds(path: Path) -> float:
    return float(read_json(path, "record", "delete it and run again", ("seconds",))["seconds"])


def fold_seconds(run: Run, fold: int) -> float:
    """Training (done.json) plus prediction seconds of one fold of a run."""
    predict = sum(json_seconds(m.meta_path) for m in run_members(run, fold))
    return json_seconds(run.fold_dir(fold) / paths.DONE) + predict
