"""Knowledge distillation (Hinton et al. 2015) as soft targets: a run with `teacher` trains towards its labels mixed
with the probabilities of other finished runs on the same data and folds. Fold k learns from each teacher's fold k,
which never saw fold k's images, so the student's out-of-fold score stays honest. Each teacher's final model of the
fold predicts the fold's training images, the mean of their 8 dihedral views (read from its precomputed maps where its
last stage trained on them); the teachers are averaged. Written once per fold to fold<k>/teacher.csv, which a resumed
fold reads back instead of predicting again."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from seedlings import paths
from seedlings.data.augment import TTA_VIEWS
from seedlings.errors import UserError
from seedlings.run import Run, saved_run
from seedlings.storage import Probs, load_probs, save_probs
from seedlings.train.checkpoint import recorded_weights
from seedlings.train.fold import FoldContext, prepare_fold
from seedlings.train.predictor import Predictor


def prepare_training(run: Run, fold: int) -> FoldContext:
    """A fold prepared to train: its data, model and device (fold.prepare_fold), and with a teacher the soft targets
    it trains towards (its refusals pin nothing of the run)."""
    ctx = prepare_fold(run, fold)
    ctx.targets = teacher_targets(ctx)
    return ctx


def teacher_targets(ctx: FoldContext) -> np.ndarray | None:
    """(cache rows, classes) float32: each training row's one-hot label weighted 1 - distill plus the teachers'
    probabilities weighted distill (rows the teachers did not predict, pseudo-labelled test images, keep their
    label); None without a teacher."""
    recipe = ctx.recipe
    if not recipe.teacher:
        return None
    path = ctx.dir / paths.TEACHER  # file,<class>...: the teachers' probabilities
    probs = read_teacher_probs(path, ctx.classes)
    if probs is None:
        gpus = [torch.cuda.current_device()] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):  # preparing a teacher seeds torch: the student's draws stay its own
            parts = [teacher_probs(ctx, name) for name in recipe.teacher]
        files = parts[0].files  # the same training images for every teacher of one fold
        rows_of = [{f: i for i, f in enumerate(p.files)} for p in parts]
        aligned = [p.values[[at[f] for f in files]] for p, at in zip(parts, rows_of, strict=True)]
        probs = Probs(np.mean(aligned, 0), files, ctx.classes)
        save_probs(path, probs)
    labels = ctx.labels
    targets = np.zeros((len(labels), len(ctx.classes)), dtype=np.float32)
    targets[labels >= 0, labels[labels >= 0]] = 1.0
    row = {f: i for i, f in enumerate(ctx.cache.files)}
    rows = np.array([row[f] for f in probs.files], dtype=int)
    targets[rows] = (1 - recipe.distill) * targets[rows] + recipe.distill * probs.values
    return targets


def teacher_probs(ctx: FoldContext, name: str) -> Probs:
    """Teacher run `name`'s final model of the fold: its probabilities of the fold's training images, each the mean
    of the 8 dihedral views."""
    if name == ctx.run.name:
        raise UserError(f"teacher: run {name!r} cannot teach itself")
    if not (paths.run_dir(name) / paths.CONFIG).exists():
        raise UserError(f"teacher: run {name!r} not found (train its folds first)")
    try:
        teacher = saved_run(name, ctx.run.data, ctx.run.n_folds, ctx.run.fold_seed)
    except UserError as e:
        raise UserError(f"teacher: run {name!r} does not share this run's data and folds: {e}") from None
    fold = ctx.fold
    if not teacher.is_trained(fold):
        raise UserError(f"teacher: fold {fold} of run {name!r} is not trained (make train RUN={name} FOLD={fold})")
    tctx = prepare_fold(teacher, fold, ctx.device)
    if tctx.classes != ctx.classes:
        raise UserError(f"teacher: run {name!r} tells apart {tctx.classes}, this run {ctx.classes}")
    redo = f"rm -r {teacher.fold_dir(fold)} && make train RUN={name} FOLD={fold} trains it again"
    tctx.model.load_state_dict(recorded_weights(tctx.dir, teacher.final_path(fold), f"fold {fold} of run {name!r}",
                                                redo, ctx.device))  # fmt: skip
    row = {f: i for i, f in enumerate(tctx.cache.files)}
    files = [ctx.cache.files[i] for i in ctx.train_idx if ctx.cache.files[i] in row]
    start = time.perf_counter()
    views = Predictor(tctx).probs("train", np.array([row[f] for f in files], dtype=int), list(TTA_VIEWS["d4"]))
    print(f"fold {fold}: teacher {name!r} predicted {len(files)} training images in {time.perf_counter() - start:.1f}s")
    return Probs(views.mean(0).numpy(), files, ctx.classes)


def read_teacher_probs(path: Path, classes: list[str]) -> Probs | None:
    """The teachers' probabilities a fold wrote before; None when absent or not readable as such (predicted again)."""
    try:
        probs = load_probs(path)
    except UserError:  # none yet, or damaged
        return None
    return probs if probs.classes == classes and np.isfinite(probs.values).all() else None
