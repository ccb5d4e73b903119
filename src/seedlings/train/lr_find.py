"""The LR range test (Smith 2015, fast.ai's lr_find): an exponential sweep at the first stage's settings."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from seedlings import paths
from seedlings.errors import UserError
from seedlings.optim import make_optimizer
from seedlings.precision import scaler_for
from seedlings.recipe.schema import SOLVED_HEAD, Recipe
from seedlings.run import Run
from seedlings.storage import load_torch, pyplot, save_figure, write_csv
from seedlings.train.checkpoint import load_checkpoint
from seedlings.train.fit import train_fold
from seedlings.train.fold import FoldContext
from seedlings.train.step import train_step
from seedlings.train.teacher import prepare_training
from seedlings.train.trainees import trainee_for


def sweep_lrs(start: float, end: float, steps: int) -> np.ndarray:
    return start * (end / start) ** (np.arange(steps) / (steps - 1))


def default_stage(recipe: Recipe) -> int:
    """The first stage trained by SGDR (a solved head has no learning rate to find)."""
    return next((i for i, s in enumerate(recipe.stages) if s.kind != SOLVED_HEAD), 0)


def weights_before_stage(run: Run, fold: int, stage: int) -> dict | None:
    """The fold's weights at the start of `stage` (None for stage 0): the end of stage - 1, from its snapshot, or
    trained now up to there exactly as `make train` would (checkpointed, so training later continues from it)."""
    recipe = run.recipe
    if not 0 <= stage < len(recipe.stages):
        raise UserError(f"--stage: {stage} is not in 0..{len(recipe.stages) - 1}")
    if recipe.stages[stage].kind == SOLVED_HEAD:
        raise UserError(f"--stage: stage {stage} is solved (fit: {recipe.stages[stage].fit}), it has no learning rate")
    if stage == 0:
        return None
    out = run.fold_dir(fold)
    snap = run.snapshot_path(fold, stage - 1, recipe.stages[stage - 1].cycles - 1)
    if not snap.exists():
        train_fold(run, fold, until_stage=stage)
    if snap.exists():
        return load_torch(snap, "snapshot")
    ckpt = load_checkpoint(out / paths.CHECKPOINT)
    if ckpt["stage"] != stage or ckpt["epoch"] != 0:
        raise UserError(f"{out}: trained past stage {stage} without snapshots; set snapshots: true or a new RUN")
    return ckpt["model"]


def lr_sweep(
    ctx: FoldContext,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
    beta: float = 0.98,
    stop_factor: float = 4.0,
    stage: int = 0,
) -> pd.DataFrame:
    """Loss at each learning rate of the sweep at `stage`'s settings (every group at the same multiple of its
    stage ratio), from the model's current weights.

    The model, optimizer state and RNG are restored afterwards: the sweep leaves no trace on training.
    """
    saved_model = copy.deepcopy(ctx.model.state_dict())
    saved_rng = torch.get_rng_state()
    trainee = trainee_for(ctx, stage)
    optimizer = make_optimizer(ctx.recipe.optimizer, trainee.param_groups, ctx.recipe.momentum)
    peak = max(g["lr"] for g in optimizer.param_groups)
    ratios = [g["lr"] / peak for g in optimizer.param_groups]  # differential LRs keep their ratios in the sweep
    criterion = nn.CrossEntropyLoss(label_smoothing=ctx.recipe.label_smoothing)
    scaler = scaler_for(ctx.precision, ctx.device)  # fp16: scaled gradients, as training takes its steps
    lrs, rows = sweep_lrs(start, end, steps), []
    avg, best, epoch = 0.0, float("inf"), 0
    batches = trainee.batches(epoch)
    trainee.train_mode()
    for i, lr in enumerate(lrs):
        try:
            x, y = next(batches)
        except StopIteration:
            epoch += 1
            batches = trainee.batches(epoch)
            x, y = next(batches)
        for g, ratio in zip(optimizer.param_groups, ratios):
            g["lr"] = lr * ratio
        loss = train_step(trainee.forward, optimizer, criterion, x, y, ctx.device, ctx.precision.train, scaler).item()
        avg = beta * avg + (1 - beta) * loss
        smoothed = avg / (1 - beta ** (i + 1))  # bias correction: early averages are not pulled towards 0
        rows.append({"step": i, "lr": float(lr), "loss": loss, "smoothed_loss": smoothed})
        best = min(best, smoothed)
        if not np.isfinite(smoothed) or smoothed > stop_factor * best:
            break
    ctx.model.load_state_dict(saved_model)
    torch.set_rng_state(saved_rng)
    return pd.DataFrame(rows)


def suggestions(df: pd.DataFrame) -> dict[str, float]:
    """valley (2/3 down the longest descent: fast.ai's default), steepest (most negative slope), minimum / 10."""
    lr, loss = df.lr.to_numpy(), df.smoothed_loss.to_numpy()
    n = len(loss)
    if n < 4:
        return {"valley": float(lr[0]), "steepest": float(lr[0]), "minimum/10": float(lr[0])}
    # longest strictly descending subsequence ending at each point (O(n^2), n is about 100)
    run = np.ones(n, int)
    prev = np.full(n, -1)
    for i in range(1, n):
        for j in range(i):
            if loss[j] > loss[i] and run[j] + 1 > run[i]:
                run[i], prev[i] = run[j] + 1, j
    end = int(run.argmax())
    start = end
    while prev[start] >= 0:
        start = prev[start]
    valley = start + int((end - start) * 2 / 3)
    lowest = int(np.argmin(loss))
    down = max(3, lowest + 1)  # the steepest descent is looked for before the minimum
    slope = np.gradient(loss[:down], np.log(lr[:down]))
    return {
        "valley": float(lr[valley]),
        "steepest": float(lr[int(np.argmin(slope))]),
        "minimum/10": float(lr[lowest] / 10),
    }


def plot_sweep(df: pd.DataFrame, suggested: dict[str, float], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(df.lr, df.smoothed_loss)
    for (name, lr), colour in zip(suggested.items(), ("red", "orange", "green")):
        y = np.interp(np.log(lr), np.log(df.lr), df.smoothed_loss)
        ax.plot([lr], [y], "o", color=colour, label=f"{name}: {lr:.2e}")
    ax.set(xscale="log", xlabel="learning rate (head group)", ylabel="smoothed loss", title="LR range test")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def lr_find(run: Run, fold: int, stage: int | None) -> None:
    """`make lr-find`: the sweep at `stage` (default: the first SGDR stage) from the weights it starts with; its CSV,
    plot and suggestions."""
    recipe = run.recipe
    stage = default_stage(recipe) if stage is None else stage
    weights = weights_before_stage(run, fold, stage)
    ctx = prepare_training(run, fold)  # the sweep trains towards what the stage will (a teacher's targets)
    if weights is not None:
        ctx.model.load_state_dict(weights)
    df = lr_sweep(ctx, recipe.lr_find_start, recipe.lr_find_end, recipe.lr_find_steps, stage=stage)
    csv, png = run.dir / f"lr_find-stage{stage}.csv", run.dir / f"lr_find-stage{stage}.png"
    write_csv(csv, df)
    sugg = suggestions(df)
    plot_sweep(df, sugg, png)
    print(f"stage {stage}, fold {fold}, from the weights that stage starts with")
    print(f"suggested lr: {sugg['valley']:.3g}  (steepest {sugg['steepest']:.3g}, minimum/10 {sugg['minimum/10']:.3g})")
    print(f"{png}, {csv}: {len(df)} steps")
