"""Train one fold with the fast.ai recipe: stages of SGDR at growing sizes, head first, checkpointed every epoch."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from seedlings.config import lrs_of
from seedlings.context import FoldContext, autocast, eval_loader, predict_probs, prepare_fold, to_device, train_step
from seedlings.data import CachedImages, EpochSampler, make_loader, train_transform
from seedlings.errors import UserError
from seedlings.files import (
    BackgroundSaver,
    cpu_copy,
    exclusive,
    load_torch,
    save_figure,
    save_torch,
    write_csv,
    write_json,
)
from seedlings.metrics import log_loss, val_scores
from seedlings.model import is_norm_param, make_optimizer, param_groups
from seedlings.run import Run
from seedlings.schedule import cycle_end_epochs, make_scheduler
from seedlings.tta import dihedral

CHECKPOINT_FORMAT = "seedlings-checkpoint-1"


# ------------------------------------------------------------------------------------------------------ precompute
@torch.no_grad()
def pooled_features(
    ctx: FoldContext, size: int, index: np.ndarray, views: tuple[int, ...] = (0,), images: np.ndarray | None = None
) -> torch.Tensor:
    """Frozen backbone's pooled features, (N, len(views), F): fast.ai's precompute; views are dihedral members."""
    ctx.model.eval()
    out = []
    for x, _ in tqdm(eval_loader(ctx, size, index, images), desc=f"features {size}px", leave=False, disable=None):
        x, model, feats = to_device(ctx, x), ctx.model, []
        for k in views:
            with autocast(ctx):
                feats.append(model.forward_head(model.forward_features(dihedral(x, k)), pre_logits=True).float())
        out.append(torch.stack(feats, 1).cpu())
    return torch.cat(out)


def features_for(ctx: FoldContext, stage_i: int) -> torch.Tensor:
    """Features of every training image; shared by all folds of a run while the backbone is still the pretrained one."""
    recipe = ctx.recipe
    stage = recipe.stages[stage_i]
    shared = all(s.freeze and s.precompute for s in recipe.stages[:stage_i])
    where = ctx.run.dir / "features" if shared else ctx.dir / "features"
    path = where / f"s{stage_i}-{stage.size}px-{'d4' if recipe.precompute_d4 else 'id'}-{len(ctx.labels)}.pt"
    if path.exists():
        return load_torch(path, "precomputed features")
    views = tuple(range(8)) if recipe.precompute_d4 else (0,)
    feats = pooled_features(ctx, stage.size, np.arange(len(ctx.labels)), views)
    save_torch(path, feats)
    return feats


# ----------------------------------------------------------------------------------------------------------- stages
@dataclass
class StagePlan:
    """What one stage trains and on what: the same epoch loop runs it with images or with precomputed features."""

    opt_groups: list[dict]
    steps_per_epoch: int
    batches: Callable[[int], Iterator]  # global epoch -> (x, y) training batches
    forward: Callable[[torch.Tensor], torch.Tensor]  # batch -> logits
    set_modes: Callable[[], None]  # train/eval mode of each module for a training epoch
    val_probs: Callable[[], np.ndarray]  # probabilities on the fold's validation images


def frozen_norm_modules(ctx: FoldContext) -> list[nn.Module]:
    names = {n.rsplit(".", 1)[0] for g in ctx.groups[:-1] for n in g if is_norm_param(ctx.model, n)}
    return [ctx.model.get_submodule(n) for n in sorted(names)]


def plan_stage(ctx: FoldContext, stage_i: int) -> StagePlan:
    recipe, stage = ctx.recipe, ctx.recipe.stages[stage_i]
    lrs = lrs_of(stage.lr, recipe.layer_groups)
    if stage.precompute:
        return plan_precompute(ctx, stage_i, lrs)
    groups = param_groups(ctx.model, ctx.groups, lrs, recipe.weight_decay, stage.freeze, recipe.train_bn)
    batches, steps = training_batches(ctx, stage.size)

    def set_modes() -> None:
        ctx.model.train()
        if recipe.bn_stats == "frozen":  # the features the head was fitted on stay the features it sees
            for m in ctx.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        elif stage.freeze and not recipe.train_bn:  # frozen norm layers keep their running statistics too
            for m in frozen_norm_modules(ctx):
                m.eval()

    model = torch.compile(ctx.model) if recipe.compile else ctx.model

    def val_probs() -> np.ndarray:
        ctx.model.eval()
        return predict_probs(ctx, model, iter(eval_loader(ctx, stage.size, ctx.val_idx)))

    return StagePlan(groups, steps, batches, model, set_modes, val_probs)


def augment_on_device(ctx: FoldContext) -> bool:
    choice = ctx.recipe.augment
    return choice == "tensor" or (choice == "auto" and ctx.device.type == "cuda")


def training_batches(ctx: FoldContext, size: int) -> tuple[Callable[[int], Iterator], int]:
    """(epoch -> training batches, batches per epoch): made on the device from the uploaded cache (tensor_aug), or
    by albumentations in the loader; both draw every random number from (seed, fold, epoch, item)."""
    recipe = ctx.recipe
    if augment_on_device(ctx):
        from seedlings.tensor_aug import DeviceBatches

        bf16 = ctx.device.type == "cuda" and recipe.bf16
        made = DeviceBatches(
            ctx.cache.images, ctx.train_idx, ctx.labels[ctx.train_idx], size, ctx.mean, ctx.std, recipe.crop_scale,
            recipe.seed, ctx.fold, recipe.batch_size, ctx.device, torch.bfloat16 if bf16 else torch.float32,
            drop_last=ctx.device.type == "cuda",  # static shapes: a ragged last batch re-tunes cuDNN (GPU only)
        )  # fmt: skip
        return made.epoch, len(made)
    ds = CachedImages(
        ctx.cache.images,
        ctx.train_idx,
        ctx.labels[ctx.train_idx],
        train_transform(size, ctx.mean, ctx.std, recipe.crop_scale),
    )
    sampler = EpochSampler(len(ds), recipe.seed, ctx.fold)
    loader = make_loader(ds, recipe.batch_size, ctx.device, sampler, recipe.num_workers)

    def batches(epoch: int) -> Iterator:
        sampler.set_epoch(epoch)
        return iter(loader)

    return batches, len(loader)


def plan_precompute(ctx: FoldContext, stage_i: int, lrs: list[float]) -> StagePlan:
    """Train only the classifier on pooled features: the frozen backbone runs once per image, not once per epoch."""
    recipe = ctx.recipe
    feats = features_for(ctx, stage_i)
    head = ctx.model.get_classifier()
    head_names = {f"{ctx.model.default_cfg['classifier']}.{n}" for n, _ in head.named_parameters()}
    if head_names != set(ctx.groups[-1]):
        raise UserError(
            f"stages.{stage_i}.precompute: the head group of {recipe.model} holds more than its classifier; "
            "use precompute: false"
        )
    groups = param_groups(ctx.model, ctx.groups, lrs, recipe.weight_decay, freeze=True, train_bn=False)
    n_views = feats.shape[1]
    x_train = feats[ctx.train_idx].reshape(-1, feats.shape[-1])  # each view a sample of its own
    y_train = torch.from_numpy(np.repeat(ctx.labels[ctx.train_idx], n_views))
    x_val = feats[ctx.val_idx, 0]  # the image as it is
    steps = -(-len(x_train) // recipe.batch_size)

    def batches(epoch: int) -> Iterator:
        order = np.random.default_rng([recipe.seed, ctx.fold, epoch]).permutation(len(x_train))
        for i in range(0, len(order), recipe.batch_size):
            j = torch.from_numpy(order[i : i + recipe.batch_size])
            yield x_train[j], y_train[j]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return head(F.dropout(x, p=recipe.drop_rate, training=head.training))

    def set_modes() -> None:
        ctx.model.eval()
        head.train()

    def val_probs() -> np.ndarray:
        head.eval()
        return predict_probs(ctx, head, iter([(x_val, None)]))

    return StagePlan(groups, steps, batches, forward, set_modes, val_probs)


# -------------------------------------------------------------------------------------------------- checkpointing
def load_checkpoint(path: Path, owner: str | None = None) -> dict:
    """A fold's checkpoint; `owner` (checkpoint_owner of the run and fold resuming it) must be the one it records."""
    ckpt = load_torch(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a seedlings checkpoint; delete it to start the fold again")
    if owner is not None and ckpt.get("owner") != owner:
        raise UserError(
            f"{path}: written by {ckpt.get('owner') or 'another run'}, not {owner}; delete it to start again"
        )
    return ckpt


def checkpoint_owner(ctx: FoldContext) -> str:
    """Run, fold and the run's training key: a checkpoint copied from another run or fold is refused instead of
    resumed with that run's metrics."""
    return f"run {ctx.run.name!r} fold {ctx.fold} recipe {ctx.run.training_key()}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------------------------------------- training
def train_fold(run: Run, fold: int, until_stage: int | None = None) -> dict:
    """Train (or resume, or skip when finished) one fold; returns the final validation scores.

    until_stage: stop (checkpointed, resumable) before that stage starts; the LR finder sweeps a later stage so.
    """
    out = run.fold_dir(fold)
    done = out / "done.json"
    if done.exists():
        print(f"{out}: finished, nothing to do")
        return json.loads(done.read_text())
    try:
        with exclusive(out / ".lock", f"fold {fold} of run {run.name!r}"):
            return train_locked(run, fold, until_stage)
    except UserError:
        remove_if_empty(out)  # refused before anything was written: no folder of the fold, nor of the run
        remove_if_empty(run.dir)
        raise


def remove_if_empty(folder: Path) -> None:
    """Remove a folder that holds nothing but a lock file."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".lock"}:
        (folder / ".lock").unlink(missing_ok=True)
        folder.rmdir()


def train_locked(run: Run, fold: int, until_stage: int | None) -> dict:
    out = run.fold_dir(fold)
    done = out / "done.json"
    if done.exists():  # finished by the process that held the lock before
        return json.loads(done.read_text())
    ctx = prepare_fold(run, fold)
    run.record()  # after the data, folds and model passed their checks: a refused first try pins no recipe
    ckpt = resume_from_checkpoint(ctx)
    log = Progress(ctx, ckpt["metrics"] if ckpt else [], ckpt["lrs"] if ckpt else [])
    try:
        for stage_i in range(len(run.recipe.stages) if until_stage is None else until_stage):
            if ckpt and stage_i < ckpt["stage"]:
                continue
            train_stage(ctx, stage_i, log, ckpt if ckpt and stage_i == ckpt["stage"] else None)
            ckpt = None
        log.saver.wait()  # a failed checkpoint write raises here
    finally:
        log.saver.close()
    if until_stage is not None:
        return {}
    save_torch(out / "final.pt", ctx.model.state_dict())
    plot_fold(out)
    final = {k: log.metrics[-1][k] for k in ("val_loss", "val_f1", "val_macro_f1")}
    final["seconds"] = float(sum(m["seconds"] for m in log.metrics))
    write_json(done, final)
    return final


def resume_from_checkpoint(ctx: FoldContext) -> dict | None:
    """The fold's checkpoint, its weights and RNG state already restored; None when the fold starts afresh."""
    path = ctx.dir / "checkpoint.pt"
    if not path.exists():
        return None
    ckpt = load_checkpoint(path, checkpoint_owner(ctx))
    ctx.model.load_state_dict(ckpt["model"])
    set_rng_state(ckpt["rng"])
    print(f"{ctx.dir}: resuming at stage {ckpt['stage']}, epoch {ckpt['epoch']} of that stage")
    return ckpt


def train_stage(ctx: FoldContext, stage_i: int, log: Progress, resume: dict | None) -> None:
    """One stage: the head solved, or SGDR epochs (from `resume`'s epoch, optimizer and scheduler when given)."""
    stage = ctx.recipe.stages[stage_i]
    if stage.fit == "logistic":
        log.epoch_done(fit_head(ctx, stage_i, len(log.metrics)), stage_i, 0, [1], None, None)
        return
    plan = plan_stage(ctx, stage_i)
    optimizer = make_optimizer(ctx.recipe, plan.opt_groups)
    warmup = round(stage.warmup * plan.steps_per_epoch)
    scheduler = make_scheduler(optimizer, plan.steps_per_epoch, stage.cycle_len, stage.cycle_mult, warmup)
    first_epoch = 0
    if resume and resume["epoch"] > 0:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        first_epoch = resume["epoch"]
    ends = cycle_end_epochs(stage.n_cycles, stage.cycle_len, stage.cycle_mult)
    for epoch in range(first_epoch, ends[-1]):
        row = train_epoch(ctx, plan, optimizer, scheduler, stage_i, len(log.metrics), log.lrs)
        log.epoch_done(row, stage_i, epoch, ends, optimizer, scheduler)


@dataclass
class Progress:
    """A fold's metrics and LR rows, and what is written after every epoch: snapshot, checkpoint, CSVs."""

    ctx: FoldContext
    metrics: list[dict]
    lrs: list[dict]
    saver: BackgroundSaver = field(default_factory=BackgroundSaver)

    def epoch_done(self, row: dict, stage_i: int, epoch: int, ends: list[int], optimizer, scheduler) -> None:
        """epoch: 0-based within the stage; ends: the stage's cycle-end epochs (1-based). Snapshots and the
        checkpoint are host copies written off the training thread (resume stays exact: they are the state now)."""
        self.metrics.append(row)
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        out, state = self.ctx.dir, cpu_copy(self.ctx.model.state_dict())
        if self.ctx.recipe.snapshots and epoch + 1 in ends:
            save_torch(out / "snapshots" / f"stage{stage_i}-cycle{ends.index(epoch + 1)}.pt", state)
        at_stage_end = epoch + 1 == ends[-1]
        # at a stage's end the next stage starts with a new optimizer: nothing of this one is kept
        self.saver.save(
            out / "checkpoint.pt",
            {
                "format": CHECKPOINT_FORMAT,
                "owner": checkpoint_owner(self.ctx),
                "model": state,
                "optimizer": None if at_stage_end else cpu_copy(optimizer.state_dict()),
                "scheduler": None if at_stage_end else cpu_copy(scheduler.state_dict()),
                "stage": stage_i + 1 if at_stage_end else stage_i,
                "epoch": 0 if at_stage_end else epoch + 1,
                "rng": rng_state(),
                "metrics": list(self.metrics),
                "lrs": list(self.lrs),
            },
        )
        write_csv(out / "metrics.csv", pd.DataFrame(self.metrics))
        if self.lrs:
            write_csv(out / "lrs.csv", pd.DataFrame(self.lrs))


@torch.no_grad()
def fit_head(ctx: FoldContext, stage_i: int, epoch: int) -> dict:
    """A `fit: logistic` stage: the classifier solved on the precomputed features (the linear probe, converged, its L2
    strength chosen by cross-validated log loss on the fold's training images); one row of metrics.csv."""
    from seedlings.baseline import fit_logistic

    start = time.perf_counter()
    stage, head = ctx.recipe.stages[stage_i], ctx.model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise UserError(f"stages.{stage_i}.fit: logistic needs a linear classifier, {ctx.recipe.model} has {head}")
    feats = features_for(ctx, stage_i)
    x_train, y_train = feats[ctx.train_idx].mean(1).numpy(), ctx.labels[ctx.train_idx]  # views averaged
    c = ctx.recipe.head_c or None
    fit = fit_logistic(x_train, y_train, len(ctx.comp.classes), c, ctx.recipe.seed, scoring="neg_log_loss")
    head.weight.copy_(torch.from_numpy(fit.weight))
    head.bias.copy_(torch.from_numpy(fit.bias))
    train_probs = torch.from_numpy(fit.logits(x_train)).softmax(-1).numpy()
    val_probs = torch.from_numpy(fit.logits(feats[ctx.val_idx, 0].numpy())).softmax(-1).numpy()
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch + 1,
        "stage": stage_i,
        "size": stage.size,
        "train_loss": log_loss(train_probs, y_train),
        **val_scores(val_probs, ctx.labels[ctx.val_idx]),
        "lr": 0.0,
        "seconds": seconds,
        "images_per_s": len(y_train) / seconds,
        "head_c": fit.c,
    }


def train_epoch(
    ctx: FoldContext, plan: StagePlan, optimizer, scheduler, stage_i: int, epoch: int, lr_rows: list[dict]
) -> dict:
    """One pass over the training batches, then the validation scores: one row of metrics.csv."""
    recipe = ctx.recipe
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    plan.set_modes()
    start, seen = time.perf_counter(), 0
    total_loss = torch.zeros((), device=ctx.device)  # summed on the device: reading it is a host sync
    bar = tqdm(
        plan.batches(epoch),
        total=plan.steps_per_epoch,
        desc=f"fold {ctx.fold} epoch {epoch + 1}",
        leave=False,
        disable=None,
    )
    for x, y in bar:
        lrs = {g["layer_group"]: g["lr"] for g in reversed(optimizer.param_groups) if g["params"]}
        lr_rows.append(
            {
                "step": len(lr_rows),
                "epoch": epoch,
                "stage": stage_i,
                **{f"lr_g{g}": lrs.get(g, 0.0) for g in range(recipe.layer_groups)},
            }
        )
        loss = train_step(ctx, plan.forward, optimizer, criterion, x, y)
        scheduler.step()
        seen += len(y)
        total_loss += loss * len(y)
        if len(lr_rows) % 50 == 0:  # the bar's loss: one host read every 50 steps, not one per step
            bar.set_postfix(
                loss=f"{total_loss.item() / seen:.3f}",
                lr=f"{lrs.get(recipe.layer_groups - 1, 0):.2e}",
                img_s=f"{seen / (time.perf_counter() - start):.0f}",
            )
    train_seconds = time.perf_counter() - start
    val = val_scores(plan.val_probs(), ctx.labels[ctx.val_idx])
    return {
        "epoch": epoch + 1,
        "stage": stage_i,
        "size": recipe.stages[stage_i].size,
        "train_loss": total_loss.item() / max(seen, 1),
        **val,
        "lr": lr_rows[-1][f"lr_g{recipe.layer_groups - 1}"] if lr_rows else 0.0,
        "seconds": time.perf_counter() - start,
        "images_per_s": seen / train_seconds,
    }


def plot_fold(out: Path) -> None:
    """loss.png (train/val loss and val micro-F1 per epoch) and lr.png (every step's LR per group); none where
    matplotlib is not installed (a bare GPU machine): the CSVs hold the same numbers."""
    try:
        import matplotlib
    except ImportError:
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = pd.read_csv(out / "metrics.csv")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(m.epoch, m.train_loss, "o-", label="train (smoothed targets)")
    ax[0].plot(m.epoch, m.val_loss, "o-", label="validation")
    ax[0].set(xlabel="epoch", ylabel="loss")
    ax[0].legend()
    ax[1].plot(m.epoch, m.val_f1, "o-", label="micro-F1")
    ax[1].plot(m.epoch, m.val_macro_f1, "o-", label="macro-F1")
    ax[1].set(xlabel="epoch", ylabel="validation F1")
    ax[1].legend()
    fig.tight_layout()
    save_figure(fig, out / "loss.png", dpi=90)
    plt.close(fig)
    if not (out / "lrs.csv").exists():  # only solved stages: no learning rates to show
        return
    lr = pd.read_csv(out / "lrs.csv")
    fig, ax = plt.subplots(figsize=(7, 3))
    for c in [c for c in lr.columns if c.startswith("lr_g")]:
        ax.plot(lr.step, lr[c], label=c[3:])
    ax.set(xlabel="step", ylabel="learning rate", yscale="log")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "lr.png", dpi=90)
    plt.close(fig)
