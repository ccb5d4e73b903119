"""Train one fold with the fast.ai recipe: stages of SGDR at growing sizes, head first, checkpointed every epoch.

`fit_fold` is the whole of a fold's training, top to bottom; the pieces it calls each do one thing: `fit_head` solves
the head (features.py), a trainee says what a stage trains and on what (trainees.py), `train_epoch` runs one pass,
`FoldLog` writes what an epoch leaves behind (checkpoint.py); tracking and a caller's epoch hook attach as callbacks
(callbacks.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from seedlings import paths
from seedlings.errors import Busy, UserError
from seedlings.metrics import NO_VALIDATION, VAL_KEYS, val_scores
from seedlings.optim import make_optimizer
from seedlings.progress import FoldProgress, bar, due
from seedlings.recipe.schema import SOLVED_HEAD
from seedlings.run import Run
from seedlings.storage import exclusive, read_json, save_torch, write_json
from seedlings.track.mlflow import track_fold
from seedlings.train.callbacks import (
    EpochHook,
    FoldCallback,
    StageCallback,
    notify,
    scores_every_epoch,
    stage_callbacks,  # fmt: skip
    step_owner,
    weights_read,
)
from seedlings.train.checkpoint import FoldLog, record_weights, resume_from_checkpoint
from seedlings.train.curves import plot_fold
from seedlings.train.features import fit_head
from seedlings.train.fold import FoldContext
from seedlings.train.mixing import mix_batch, mixed_criterion
from seedlings.train.schedule import cycle_end_epochs, make_scheduler
from seedlings.train.step import train_step
from seedlings.train.teacher import prepare_training
from seedlings.train.trainees import trainee_for


def train_fold(run: Run, fold: int, until_stage: int | None = None, on_epoch: Callable[[dict], None] | None = None,
               chain: Sequence[int] | None = None) -> dict:  # fmt: skip
    """Train (or resume, or skip when finished) one fold under its lock; returns the final validation scores.

    until_stage: stop (checkpointed, resumable) before that stage starts; the LR finder sweeps a later stage so.
    on_epoch: called after every epoch (a sweep reports the score to its pruner there, which may stop the fold).
    chain: the folds the caller trains in turn, for the progress's "fold k/n" and ETA (a sweep trains the first
    sweep_folds of a trial's split); None: the run's own (its recipe's folds, then the full fit).
    """
    out = run.fold_dir(fold)
    done = out / paths.DONE
    if done.exists():
        print(f"{out}: finished, nothing to do")
        return read_done(done, fold)
    try:
        with exclusive(out / paths.LOCK, f"fold {fold} of run {run.name!r}"):
            if done.exists():  # finished by the process that held the lock before
                return read_done(done, fold)
            ctx = prepare_training(run, fold)  # with a teacher, its soft targets too
            run.record()  # after the data, folds and model passed their checks: a refused first try pins no recipe
            callbacks = [track_fold(run, fold), *([EpochHook(on_epoch)] if on_epoch else [])]
            try:
                return fit_fold(ctx, until_stage, callbacks, chain)
            except BaseException:  # pruned, interrupted, failed: its MLflow run says so until a resume goes on
                notify(callbacks, "stopped")
                raise
    except Busy:
        raise  # the folder and its lock file are the holder's
    except UserError:
        remove_if_empty(out)  # refused before anything was written: no folder of the fold, nor of the run
        remove_if_empty(run.dir)
        raise


def read_done(done: Path, fold: int) -> dict:
    fix = f"delete it, and make train FOLD={fold} finishes the fold again from its checkpoint"
    return read_json(done, "record of a finished fold", fix, (*VAL_KEYS, "seconds"))


def fit_fold(ctx: FoldContext, until_stage: int | None = None, callbacks: Sequence[FoldCallback] = (),
             chain: Sequence[int] | None = None) -> dict:  # fmt: skip
    """A fold's training from its checkpoint (or from the start) to done.json: every stage, every epoch, each
    epoch's row and the fold's end told to the callbacks (train/callbacks.py)."""
    recipe = ctx.recipe
    every_epoch = recipe.validate == "epoch" or scores_every_epoch(callbacks)  # a pruner reads every epoch's score
    ckpt = resume_from_checkpoint(ctx)  # weights and RNG restored; None: a fresh start
    log = FoldLog(ctx, ckpt["metrics"] if ckpt else [], ckpt["lrs"] if ckpt else [])
    progress = fold_progress(ctx, until_stage, log.metrics, chain)
    try:
        for stage_i, stage in enumerate(recipe.stages[:until_stage]):
            resuming = ckpt is not None and stage_i == ckpt["stage"]
            if ckpt is not None and stage_i < ckpt["stage"]:
                continue  # finished before the interruption
            if stage.kind == SOLVED_HEAD:  # the head solved on precomputed features: one row, no epochs
                log.epoch_done(fit_head(ctx, stage_i, len(log.metrics)), stage_i, 0, [1], None, None)
                progress.epoch(log.metrics[-1])
                notify(callbacks, "after_solved_head", log.metrics[-1])
                continue
            trainee = trainee_for(ctx, stage_i)
            optimizer = make_optimizer(recipe.optimizer, trainee.param_groups, recipe.momentum)
            warmup = round(stage.warmup * trainee.steps_per_epoch)
            scheduler = make_scheduler(optimizer, trainee.steps_per_epoch, stage.cycle_len, stage.cycle_mult, warmup)
            extras = stage_callbacks(ctx, optimizer)  # the weight average, fp16's scaler: each where the recipe asks
            first_epoch = 0
            if resuming and ckpt["epoch"] > 0:  # within the stage: its optimizer and schedule go on where they were
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
                for extra in extras:  # a checkpoint from before the scaler kept its state holds none: it starts anew
                    if ckpt.get(extra.key) is not None:
                        extra.load_state_dict(ckpt[extra.key])
                first_epoch = ckpt["epoch"]
            ends = cycle_end_epochs(stage.n_cycles, stage.cycle_len, stage.cycle_mult)
            for epoch in range(first_epoch, ends[-1]):
                start = time.perf_counter()
                train = train_epoch(ctx, trainee, optimizer, scheduler, stage_i, len(log.metrics), log.lrs, extras,
                                    progress.epoch_desc())  # fmt: skip
                if epoch + 1 == ends[-1]:
                    notify(extras, "after_stage")
                scored = len(ctx.val_idx) > 0 and (every_epoch or epoch + 1 in ends)
                with weights_read(extras if scored else ()):
                    val = val_scores(trainee.val_probs(), ctx.labels[ctx.val_idx]) if scored else NO_VALIDATION
                row = {"epoch": len(log.metrics) + 1, "stage": stage_i, "size": stage.size,
                       "train_loss": train["train_loss"], **val, "lr": train["lr"],
                       "seconds": time.perf_counter() - start, "images_per_s": train["images_per_s"]}  # fmt: skip
                notify(extras, "after_epoch", row)  # fp16: the steps whose gradients overflowed, skipped
                log.epoch_done(row, stage_i, epoch, ends, optimizer, scheduler, extras)  # snapshots, checkpoint, CSVs
                progress.epoch(row)
                notify(callbacks, "after_epoch", row)
        log.saver.wait()  # a failed checkpoint write raises here
    finally:
        log.saver.close()
        progress.close()
    if until_stage is not None:
        return {}
    record_weights(ctx.dir, save_torch(ctx.run.final_path(ctx.fold), ctx.model.state_dict()))
    plot_fold(ctx.dir, recipe)
    final = {k: log.metrics[-1][k] for k in VAL_KEYS}
    final["seconds"] = float(sum(m["seconds"] for m in log.metrics))
    final["threads"] = torch.get_num_threads()  # CPU results depend on it (README: what is refused, thread count)
    write_json(ctx.dir / paths.DONE, final)
    notify(callbacks, "after_fold", final, ctx.dir)
    return final


def train_epoch(ctx: FoldContext, trainee, optimizer, scheduler, stage_i: int, epoch: int, lr_rows: list[dict],
                extras: Sequence[StageCallback] = (), desc: str = "") -> dict:  # fmt: skip
    """One pass over the training batches, every step's learning rates appended to lr_rows and the stage's callbacks
    told after every step (fp16: the scaler takes the step), shown as a bar described `desc`: train loss, the head's
    last learning rate, images/s."""
    recipe = ctx.recipe
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    scaler = step_owner(extras)  # fp16: scaled gradients, a step skipped on an overflow; None: a plain step
    trainee.train_mode()
    start, seen = time.perf_counter(), 0
    total_loss = torch.zeros((), device=ctx.device)  # summed on the device: reading it is a host sync
    steps = bar(trainee.batches(epoch), total=trainee.steps_per_epoch, desc=desc, unit="step")
    for x, y in steps:
        lrs = {g["layer_group"]: g["lr"] for g in reversed(optimizer.param_groups) if g["params"]}
        lr_rows.append({"step": len(lr_rows), "epoch": epoch, "stage": stage_i,
                        **{f"lr_g{g}": lrs.get(g, 0.0) for g in range(recipe.layer_groups)}})  # fmt: skip
        step_loss = criterion
        if trainee.mixes:  # mixup / cutmix: the batch's pairs and weights from (seed, fold, epoch, step)
            key = (recipe.seed, ctx.fold, epoch, len(lr_rows))
            x, y_a, y_b, lam = mix_batch(x, y, recipe.mixup_alpha, recipe.cutmix_alpha, key)
            step_loss = mixed_criterion(criterion, y_a, y_b, lam)
        loss = train_step(trainee.forward, optimizer, step_loss, x, y, ctx.device, ctx.precision.train, scaler)
        scheduler.step()
        notify(extras, "after_step")
        seen += len(y)
        total_loss += loss * len(y)
        if due(steps):  # the bar's loss read from the device only when the bar draws, not on every step
            steps.set_postfix(loss=f"{total_loss.item() / seen:.3f}", lr=f"{lrs.get(recipe.layer_groups - 1, 0):.2e}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")  # fmt: skip
    return {
        "train_loss": total_loss.item() / max(seen, 1),
        "lr": lr_rows[-1][f"lr_g{recipe.layer_groups - 1}"] if lr_rows else 0.0,
        "images_per_s": seen / (time.perf_counter() - start),
    }


def epoch_plan(stages) -> list[tuple[int, int, bool]]:
    """Each epoch of `stages` in order: (stage, size, whether it is a solved head's single row)."""
    plan = []
    for i, stage in enumerate(stages):
        if stage.kind == SOLVED_HEAD:
            plan.append((i, stage.size, True))
        else:
            plan += [(i, stage.size, False)] * cycle_end_epochs(stage.n_cycles, stage.cycle_len, stage.cycle_mult)[-1]
    return plan


def fold_progress(ctx: FoldContext, until_stage: int | None, done: list[dict],
                  chain: Sequence[int] | None = None) -> FoldProgress:  # fmt: skip
    """The fold's progress lines: "fold 1/2" among the models the chain trains, the ETA counting those not trained."""
    run = ctx.run
    models = list(chain) if chain is not None else run.models()
    what = "full fit" if ctx.fold == run.full else "fold"
    label = f"{what} {models.index(ctx.fold) + 1}/{len(models)}" if ctx.fold in models else f"{what} {ctx.fold}"
    after = sum(1 for k in models if k != ctx.fold and not run.is_trained(k))
    plan = epoch_plan(ctx.recipe.stages[:until_stage])
    return FoldProgress(label, plan, done, after, f"fold {ctx.fold} of run {run.name!r}")


def remove_if_empty(folder: Path) -> None:
    """Remove a folder that holds nothing but a lock file."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {paths.LOCK}:
        (folder / paths.LOCK).unlink(missing_ok=True)
        folder.rmdir()
