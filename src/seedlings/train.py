"""Train one fold with the fast.ai recipe: stages of SGDR at growing sizes, head first, checkpointed every epoch.

`fit_fold` is the whole of a fold's training, top to bottom; the pieces it calls each do one thing: `fit_head` solves
the head (features.py), `WholeNet` and `HeadOnFeatures` say what a stage trains and on what, `train_epoch` runs one
pass, `FoldLog` writes what an epoch leaves behind (checkpoint.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from seedlings.checkpoint import FoldLog, record_weights, resume_from_checkpoint
from seedlings.config import Stage, lrs_of
from seedlings.context import FoldContext, eval_loader, predict_probs, prepare_fold, training_batches
from seedlings.data import batch_slices
from seedlings.errors import Busy, UserError
from seedlings.features import FrozenCut, features_for, fit_head
from seedlings.files import exclusive, read_json, save_torch, write_json
from seedlings.metrics import val_scores
from seedlings.mixing import mix_batch, mixed_criterion
from seedlings.model import is_norm_param, make_optimizer, param_groups
from seedlings.report import plot_fold
from seedlings.run import Run
from seedlings.schedule import cycle_end_epochs, make_scheduler
from seedlings.step import bf16_forwards, train_step

EpochHook = Callable[[dict], None]  # called with each epoch's metrics row once its checkpoint is written
# the full fit (no validation images), and the epochs inside a cycle with validate: cycle
NO_VALIDATION = {"val_loss": float("nan"), "val_f1": float("nan"), "val_macro_f1": float("nan")}


def train_fold(run: Run, fold: int, until_stage: int | None = None, on_epoch: EpochHook | None = None) -> dict:
    """Train (or resume, or skip when finished) one fold under its lock; returns the final validation scores.

    until_stage: stop (checkpointed, resumable) before that stage starts; the LR finder sweeps a later stage so.
    on_epoch: called after every epoch (a sweep reports the score to its pruner there, which may stop the fold).
    """
    out = run.fold_dir(fold)
    done = out / "done.json"
    if done.exists():
        print(f"{out}: finished, nothing to do")
        return read_done(done, fold)
    try:
        with exclusive(out / ".lock", f"fold {fold} of run {run.name!r}"):
            if done.exists():  # finished by the process that held the lock before
                return read_done(done, fold)
            ctx = prepare_fold(run, fold)
            run.record()  # after the data, folds and model passed their checks: a refused first try pins no recipe
            return fit_fold(ctx, until_stage, on_epoch)
    except Busy:
        raise  # the folder and its lock file are the holder's
    except UserError:
        remove_if_empty(out)  # refused before anything was written: no folder of the fold, nor of the run
        remove_if_empty(run.dir)
        raise


def read_done(done: Path, fold: int) -> dict:
    fix = f"delete it, and make train FOLD={fold} finishes the fold again from its checkpoint"
    return read_json(done, "record of a finished fold", fix, ("val_loss", "val_f1", "val_macro_f1", "seconds"))


def fit_fold(ctx: FoldContext, until_stage: int | None = None, on_epoch: EpochHook | None = None) -> dict:
    """A fold's training from its checkpoint (or from the start) to done.json: every stage, every epoch."""
    recipe = ctx.recipe
    every_epoch = recipe.validate == "epoch" or on_epoch is not None  # a pruner reads every epoch's score
    ckpt = resume_from_checkpoint(ctx)  # weights and RNG restored; None: a fresh start
    log = FoldLog(ctx, ckpt["metrics"] if ckpt else [], ckpt["lrs"] if ckpt else [])
    try:
        for stage_i, stage in enumerate(recipe.stages[:until_stage]):
            resuming = ckpt is not None and stage_i == ckpt["stage"]
            if ckpt is not None and stage_i < ckpt["stage"]:
                continue  # finished before the interruption
            if stage.fit == "logistic":  # the head solved on precomputed features: one row, no epochs
                log.epoch_done(fit_head(ctx, stage_i, len(log.metrics)), stage_i, 0, [1], None, None)
                continue
            trainee = trainee_for(ctx, stage_i)
            optimizer = make_optimizer(recipe, trainee.param_groups)
            warmup = round(stage.warmup * trainee.steps_per_epoch)
            scheduler = make_scheduler(optimizer, trainee.steps_per_epoch, stage.cycle_len, stage.cycle_mult, warmup)
            first_epoch = 0
            if resuming and ckpt["epoch"] > 0:  # within the stage: its optimizer and schedule go on where they were
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
                first_epoch = ckpt["epoch"]
            ends = cycle_end_epochs(stage.n_cycles, stage.cycle_len, stage.cycle_mult)
            for epoch in range(first_epoch, ends[-1]):
                start = time.perf_counter()
                train = train_epoch(ctx, trainee, optimizer, scheduler, stage_i, len(log.metrics), log.lrs)
                scored = len(ctx.val_idx) > 0 and (every_epoch or epoch + 1 in ends)
                val = val_scores(trainee.val_probs(), ctx.labels[ctx.val_idx]) if scored else NO_VALIDATION
                row = {"epoch": len(log.metrics) + 1, "stage": stage_i, "size": stage.size,
                       "train_loss": train["train_loss"], **val, "lr": train["lr"],
                       "seconds": time.perf_counter() - start, "images_per_s": train["images_per_s"]}  # fmt: skip
                log.epoch_done(row, stage_i, epoch, ends, optimizer, scheduler)  # snapshot, checkpoint, CSVs
                if on_epoch is not None:
                    on_epoch(row)
        log.saver.wait()  # a failed checkpoint write raises here
    finally:
        log.saver.close()
    if until_stage is not None:
        return {}
    record_weights(ctx.dir, save_torch(ctx.dir / "final.pt", ctx.model.state_dict()))
    plot_fold(ctx.dir)
    final = {k: log.metrics[-1][k] for k in ("val_loss", "val_f1", "val_macro_f1")}
    final["seconds"] = float(sum(m["seconds"] for m in log.metrics))
    final["threads"] = torch.get_num_threads()  # CPU results depend on it (README: several processes)
    write_json(ctx.dir / "done.json", final)
    return final


def train_epoch(ctx: FoldContext, trainee, optimizer, scheduler, stage_i: int, epoch: int, lr_rows: list[dict]) -> dict:
    """One pass over the training batches, every step's learning rates appended to lr_rows: train loss, the head's
    last learning rate, images/s."""
    recipe = ctx.recipe
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    trainee.train_mode()
    start, seen = time.perf_counter(), 0
    total_loss = torch.zeros((), device=ctx.device)  # summed on the device: reading it is a host sync
    bar = tqdm(trainee.batches(epoch), total=trainee.steps_per_epoch, desc=f"fold {ctx.fold} epoch {epoch + 1}",
               leave=False, disable=None)  # fmt: skip
    for x, y in bar:
        lrs = {g["layer_group"]: g["lr"] for g in reversed(optimizer.param_groups) if g["params"]}
        lr_rows.append({"step": len(lr_rows), "epoch": epoch, "stage": stage_i,
                        **{f"lr_g{g}": lrs.get(g, 0.0) for g in range(recipe.layer_groups)}})  # fmt: skip
        step_loss = criterion
        if trainee.mixes:  # mixup / cutmix: the batch's pairs and weights from (seed, fold, epoch, step)
            key = (recipe.seed, ctx.fold, epoch, len(lr_rows))
            x, y_a, y_b, lam = mix_batch(x, y, recipe.mixup_alpha, recipe.cutmix_alpha, key)
            step_loss = mixed_criterion(criterion, y_a, y_b, lam)
        loss = train_step(trainee.forward, optimizer, step_loss, x, y, ctx.device, ctx.bf16)
        scheduler.step()
        seen += len(y)
        total_loss += loss * len(y)
        if len(lr_rows) % 50 == 0:  # the bar's loss: one host read every 50 steps, not one per step
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}", lr=f"{lrs.get(recipe.layer_groups - 1, 0):.2e}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")  # fmt: skip
    return {
        "train_loss": total_loss.item() / max(seen, 1),
        "lr": lr_rows[-1][f"lr_g{recipe.layer_groups - 1}"] if lr_rows else 0.0,
        "images_per_s": seen / (time.perf_counter() - start),
    }


class WholeNet:
    """An SGDR stage on augmented images through the network (with freeze: the head and, with train_bn, the norm
    layers' affine parameters train; without it every layer group does, at its own learning rate)."""

    def __init__(self, ctx: FoldContext, stage_i: int):
        recipe, stage = ctx.recipe, ctx.recipe.stages[stage_i]
        self.ctx, self.stage = ctx, stage
        lrs = lrs_of(stage.lr, recipe.layer_groups)
        self.param_groups = param_groups(ctx.model, ctx.groups, lrs, recipe.weight_decay, stage.freeze, recipe.train_bn,
                                         stage.frozen_groups)  # fmt: skip
        self.batches, self.steps_per_epoch = training_batches(ctx, stage.size)
        self.net = torch.compile(ctx.model) if recipe.compile else ctx.model
        self.mixes = bool(recipe.mixup_alpha or recipe.cutmix_alpha)
        frozen = {n for names in ctx.groups[: stage.frozen_groups] for n in names}
        # on a CPU the frozen groups run in bf16 (CUDA trains the whole network in bf16 already)
        self.bf16_modules = outermost_within(ctx.model, frozen) if ctx.device.type == "cpu" and recipe.bf16 else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with bf16_forwards(self.bf16_modules, self.ctx.device):
            return self.net(x)

    def train_mode(self) -> None:
        network_train_mode(self.ctx, self.stage)

    def val_probs(self) -> np.ndarray:
        self.ctx.model.eval()
        return predict_probs(self.ctx, self.forward, iter(eval_loader(self.ctx, self.stage.size, self.ctx.val_idx)))


def network_train_mode(ctx: FoldContext, stage: Stage) -> None:
    """Training mode, but the batch norms that must keep their running statistics in eval mode."""
    ctx.model.train()
    if ctx.recipe.bn_stats == "frozen":  # the features the head was fitted on stay the features it sees
        for m in ctx.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return
    if stage.freeze and not ctx.recipe.train_bn:  # frozen norm layers keep their running statistics too
        for m in frozen_norm_modules(ctx, len(ctx.groups) - 1):
            m.eval()
    elif stage.frozen_groups:  # so do the norms of the groups that stay frozen
        for m in frozen_norm_modules(ctx, stage.frozen_groups):
            m.eval()


def outermost_within(model: nn.Module, names: set[str]) -> list[nn.Module]:
    """The outermost submodules whose parameters are all in `names` (tf_efficientnet_lite2 with 3 of 5 groups frozen:
    conv_stem, bn1, blocks.0 to blocks.4)."""
    found = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = [prefix + n for n, _ in module.named_parameters()]
        if params and all(n in names for n in params):
            found.append(module)
            return
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return found


def frozen_norm_modules(ctx: FoldContext, n_groups: int) -> list[nn.Module]:
    """The norm layers of the first n_groups layer groups."""
    names = {n.rsplit(".", 1)[0] for g in ctx.groups[:n_groups] for n in g if is_norm_param(ctx.model, n)}
    return [ctx.model.get_submodule(n) for n in sorted(names)]


class HeadOnFeatures:
    """An SGDR stage of the classifier alone on pooled features precomputed once (fast.ai's precompute=True): the
    frozen backbone runs once per image, not once per epoch."""

    def __init__(self, ctx: FoldContext, stage_i: int):
        recipe = ctx.recipe
        self.ctx, self.head = ctx, ctx.model.get_classifier()
        feats = features_for(ctx, stage_i)
        head_names = {f"{ctx.model.default_cfg['classifier']}.{n}" for n, _ in self.head.named_parameters()}
        if head_names != set(ctx.groups[-1]):
            raise UserError(f"stages.{stage_i}.precompute: the head group of {recipe.model} holds more than its "
                            "classifier; use precompute: false")  # fmt: skip
        lrs = lrs_of(recipe.stages[stage_i].lr, recipe.layer_groups)
        self.param_groups = param_groups(ctx.model, ctx.groups, lrs, recipe.weight_decay, freeze=True, train_bn=False)
        n_views = feats.shape[1]
        self.x_train = feats[ctx.train_idx].reshape(-1, feats.shape[-1])  # each view a sample of its own
        self.y_train = torch.from_numpy(np.repeat(ctx.labels[ctx.train_idx], n_views))
        self.x_val = feats[ctx.val_idx, 0]  # the image as it is
        self.steps_per_epoch = -(-len(self.x_train) // recipe.batch_size)
        self.mixes = False  # pooled features are not images: nothing to mix

    def batches(self, epoch: int) -> Iterator:
        recipe = self.ctx.recipe
        order = np.random.default_rng([recipe.seed, self.ctx.fold, epoch]).permutation(len(self.x_train))
        for i in range(0, len(order), recipe.batch_size):
            j = torch.from_numpy(order[i : i + recipe.batch_size])
            yield self.x_train[j], self.y_train[j]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(x, p=self.ctx.recipe.drop_rate, training=self.head.training))

    def train_mode(self) -> None:
        self.ctx.model.eval()
        self.head.train()

    def val_probs(self) -> np.ndarray:
        self.head.eval()
        return predict_probs(self.ctx, self.head, iter([(self.x_val, None)]))


class AfterFrozenMaps:
    """An SGDR stage whose frozen groups (`frozen_groups`) ran once, not once per epoch (`precompute` without
    `freeze`): their output for the 8 dihedral views of every image is computed once (features.FrozenCut), and each
    epoch trains the layers after them on one view of each image, drawn by (seed, fold, epoch); mixup and cutmix mix
    those maps. The views are the whole of its augmentation: no crop, no colour jitter."""

    def __init__(self, ctx: FoldContext, stage_i: int):
        recipe, stage = ctx.recipe, ctx.recipe.stages[stage_i]
        self.ctx, self.stage = ctx, stage
        self.cut = FrozenCut.of(ctx, stage_i)
        self.maps = self.cut.train_maps()
        lrs = lrs_of(stage.lr, recipe.layer_groups)
        self.param_groups = param_groups(ctx.model, ctx.groups, lrs, recipe.weight_decay, False, recipe.train_bn,
                                         stage.frozen_groups)  # fmt: skip
        self.steps_per_epoch = len(batch_slices(len(ctx.train_idx), recipe.batch_size))
        self.mixes = bool(recipe.mixup_alpha or recipe.cutmix_alpha)
        self.forward = self.cut.top

    def batches(self, epoch: int) -> Iterator:
        ctx, recipe = self.ctx, self.ctx.recipe
        rng = np.random.default_rng([recipe.seed, ctx.fold, epoch])
        rows = ctx.train_idx[rng.permutation(len(ctx.train_idx))]
        views = rng.integers(0, self.maps.shape[1], len(rows))
        for s in batch_slices(len(rows), recipe.batch_size):
            yield self.maps[rows[s], views[s]].float(), torch.from_numpy(ctx.labels[rows[s]])

    def train_mode(self) -> None:
        network_train_mode(self.ctx, self.stage)

    def val_probs(self) -> np.ndarray:
        self.ctx.model.eval()
        return predict_probs(self.ctx, self.forward, self.cut.view_batches(self.maps, self.ctx.val_idx, 0))


def trainee_for(ctx: FoldContext, stage_i: int) -> WholeNet | HeadOnFeatures | AfterFrozenMaps:
    """What stage `stage_i` trains (an SGDR stage), as fit_fold builds it: the LR finder and the benchmark use it."""
    stage = ctx.recipe.stages[stage_i]
    if not stage.precompute:
        return WholeNet(ctx, stage_i)
    return HeadOnFeatures(ctx, stage_i) if stage.freeze else AfterFrozenMaps(ctx, stage_i)


def remove_if_empty(folder: Path) -> None:
    """Remove a folder that holds nothing but a lock file."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".lock"}:
        (folder / ".lock").unlink(missing_ok=True)
        folder.rmdir()
