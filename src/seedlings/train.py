"""Train one fold with the fast.ai recipe: stages of SGDR at growing sizes, head first, checkpointed every epoch."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn
from tqdm import tqdm

from seedlings import paths
from seedlings.cache import ImageCache, load_cache
from seedlings.config import Recipe, Stage, lrs_of, recipe_dict, save_recipe
from seedlings.data import CachedImages, EpochSampler, eval_transform, make_loader, train_transform
from seedlings.errors import UserError
from seedlings.folds import load_folds
from seedlings.images import Competition, scan_competition
from seedlings.model import create_model, is_norm_param, layer_groups, make_optimizer, model_mean_std, param_groups
from seedlings.schedule import cycle_end_epochs, make_scheduler
from seedlings.tta import dihedral

CHECKPOINT_FORMAT = "seedlings-checkpoint-1"


# ---------------------------------------------------------------------------------------------------------- context
@dataclass
class Fold:
    """Everything one fold's training reads: data, model, layer groups, device."""

    recipe: Recipe
    run: str
    fold: int
    comp: Competition
    cache: ImageCache
    labels: np.ndarray  # label of every training image (index into comp.classes)
    train_idx: np.ndarray  # cache rows of this fold's training images
    val_idx: np.ndarray  # cache rows of its validation images
    model: nn.Module
    groups: list[list[str]]  # parameter names per layer group, head last
    device: torch.device
    mean: tuple
    std: tuple

    @property
    def dir(self) -> Path:
        return paths.fold_dir(self.run, self.fold)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_fold(
    recipe: Recipe,
    data: str | Path,
    run: str,
    fold: int,
    n_folds: int = 5,
    fold_seed: int = 0,
    device: torch.device | None = None,
) -> Fold:
    comp = scan_competition(data)
    folds = load_folds(data, n_folds, fold_seed)
    if not 0 <= fold < n_folds:
        raise UserError(f"--fold: {fold} is not in 0..{n_folds - 1}")
    cache = load_cache(comp, "train", recipe.cache_size, recipe.skip_bad_images)
    good = ~np.isin(np.array(comp.train_files), cache.bad)
    in_val = folds.fold.to_numpy() == fold
    device = device or pick_device()
    torch.manual_seed(recipe.seed * 1000 + fold)  # the new head's initial weights
    # channels_last: 1.7x faster training of tf_efficientnet_lite0 on this 2-core CPU (measured), the fast path on GPUs
    model = create_model(recipe, len(comp.classes)).to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    mean, std = model_mean_std(model)
    return Fold(
        recipe,
        run,
        fold,
        comp,
        cache,
        np.array(comp.train_labels),
        np.flatnonzero(good & ~in_val),
        np.flatnonzero(good & in_val),
        model,
        layer_groups(model, recipe.layer_groups),
        device,
        mean,
        std,
    )


def autocast(fd: Fold):
    if fd.device.type == "cuda" and fd.recipe.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(fd: Fold, x: torch.Tensor) -> torch.Tensor:
    x = x.to(fd.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


# ------------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict_probs(fd: Fold, forward: Callable, batches: Iterator) -> np.ndarray:
    out = []
    for x, _ in batches:
        with autocast(fd):
            out.append(forward(to_device(fd, x)).float().softmax(-1).cpu())
    return torch.cat(out).numpy()


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Validation loss (plain cross-entropy), micro-F1 (the competition metric, = accuracy) and macro-F1."""
    pred = probs.argmax(1)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {
        "val_loss": loss,
        "val_f1": float(f1_score(labels, pred, average="micro")),
        "val_macro_f1": float(f1_score(labels, pred, average="macro")),
    }


def eval_loader(fd: Fold, size: int, index: np.ndarray, images: np.ndarray | None = None):
    ds = CachedImages(
        fd.cache.images if images is None else images,
        index,
        fd.labels[index] if images is None else None,
        eval_transform(size, fd.mean, fd.std),
    )
    return make_loader(ds, fd.recipe.batch_size * 2, fd.device, num_workers=fd.recipe.num_workers)


# ------------------------------------------------------------------------------------------------------ precompute
@torch.no_grad()
def pooled_features(
    fd: Fold, size: int, index: np.ndarray, views: tuple[int, ...] = (0,), images: np.ndarray | None = None
) -> torch.Tensor:
    """Frozen backbone's pooled features, (N, len(views), F): fast.ai's precompute; views are dihedral members."""
    fd.model.eval()
    out = []
    for x, _ in tqdm(eval_loader(fd, size, index, images), desc=f"features {size}px", leave=False, disable=None):
        x = to_device(fd, x)
        feats = []
        for k in views:
            with autocast(fd):
                feats.append(fd.model.forward_head(fd.model.forward_features(dihedral(x, k)), pre_logits=True).float())
        out.append(torch.stack(feats, 1).cpu())
    return torch.cat(out)


def features_for(fd: Fold, stage_i: int) -> torch.Tensor:
    """Features of every training image; shared by all folds of a run while the backbone is still the pretrained one."""
    stage, r = fd.recipe.stages[stage_i], fd.recipe
    shared = all(s.freeze and s.precompute for s in r.stages[:stage_i])
    where = paths.run_dir(fd.run) / "features" if shared else fd.dir / "features"
    key = f"s{stage_i}-{stage.size}px-{'d4' if r.precompute_d4 else 'id'}-{len(fd.labels)}.pt"
    path = where / key
    if path.exists():
        return torch.load(path, weights_only=True)
    feats = pooled_features(fd, stage.size, np.arange(len(fd.labels)), tuple(range(8)) if r.precompute_d4 else (0,))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(feats, tmp)
    tmp.replace(path)
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


def frozen_norm_modules(fd: Fold) -> list[nn.Module]:
    names = {n.rsplit(".", 1)[0] for g in fd.groups[:-1] for n in g if is_norm_param(fd.model, n)}
    return [fd.model.get_submodule(n) for n in sorted(names)]


def plan_stage(fd: Fold, stage_i: int) -> StagePlan:
    r, stage = fd.recipe, fd.recipe.stages[stage_i]
    lrs = lrs_of(stage.lr, r.layer_groups)
    bs = r.batch_size
    if stage.precompute:
        return plan_precompute(fd, stage_i, lrs)
    groups = param_groups(fd.model, fd.groups, lrs, r.weight_decay, stage.freeze, r.train_bn)
    ds = CachedImages(
        fd.cache.images,
        fd.train_idx,
        fd.labels[fd.train_idx],
        train_transform(stage.size, fd.mean, fd.std, r.crop_scale),
    )
    sampler = EpochSampler(len(ds), r.seed, fd.fold)
    loader = make_loader(ds, bs, fd.device, sampler, r.num_workers)

    def batches(epoch: int) -> Iterator:
        sampler.set_epoch(epoch)
        return iter(loader)

    def set_modes() -> None:
        fd.model.train()
        if r.bn_stats == "frozen":  # the features the head was fitted on stay the features it sees
            for m in fd.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        elif stage.freeze and not r.train_bn:  # frozen norm layers keep their running statistics too
            for m in frozen_norm_modules(fd):
                m.eval()

    model = torch.compile(fd.model) if r.compile and fd.device.type == "cuda" else fd.model

    def val_probs() -> np.ndarray:
        fd.model.eval()
        return predict_probs(fd, model, iter(eval_loader(fd, stage.size, fd.val_idx)))

    return StagePlan(groups, len(loader), batches, model, set_modes, val_probs)


def plan_precompute(fd: Fold, stage_i: int, lrs: list[float]) -> StagePlan:
    """Train only the classifier on pooled features: the frozen backbone runs once per image, not once per epoch."""
    r = fd.recipe
    feats = features_for(fd, stage_i)
    head = fd.model.get_classifier()
    head_names = {f"{fd.model.default_cfg['classifier']}.{n}" for n, _ in head.named_parameters()}
    if head_names != set(fd.groups[-1]):
        raise UserError(
            f"stages.{stage_i}.precompute: the head group of {r.model} holds more than its classifier; "
            "use precompute: false"
        )
    groups = param_groups(fd.model, fd.groups, lrs, r.weight_decay, freeze=True, train_bn=False)
    n_views = feats.shape[1]
    x_train = feats[fd.train_idx].reshape(-1, feats.shape[-1])  # each view a sample of its own
    y_train = torch.from_numpy(np.repeat(fd.labels[fd.train_idx], n_views))
    x_val = feats[fd.val_idx, 0]  # the image as it is
    steps = -(-len(x_train) // r.batch_size)

    def batches(epoch: int) -> Iterator:
        order = np.random.default_rng([r.seed, fd.fold, epoch]).permutation(len(x_train))
        for i in range(0, len(order), r.batch_size):
            j = torch.from_numpy(order[i : i + r.batch_size])
            yield x_train[j], y_train[j]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return head(F.dropout(x, p=r.drop_rate, training=head.training))

    def set_modes() -> None:
        fd.model.eval()
        head.train()

    def val_probs() -> np.ndarray:
        head.eval()
        return predict_probs(fd, head, iter([(x_val, None)]))

    return StagePlan(groups, steps, batches, forward, set_modes, val_probs)


# -------------------------------------------------------------------------------------------------- checkpointing
def save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or unsafe: the user has to know which file
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}); delete it to start again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a seedlings checkpoint; delete it to start the fold again")
    return ckpt


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False, lineterminator="\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------ provenance
def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=paths.REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=paths.REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def record_recipe(recipe: Recipe, run: str) -> None:
    """runs/<run>/config.yaml: the resolved recipe and git commit; a run never silently changes its recipe."""
    import yaml

    path = paths.run_dir(run) / "config.yaml"
    if path.exists():
        old = yaml.safe_load(path.read_text())
        old = {k: v for k, v in old.items() if k not in ("git_commit",)}
        if old != recipe_dict(recipe):
            changed = sorted(k for k in recipe_dict(recipe) if old.get(k) != recipe_dict(recipe)[k])
            raise UserError(
                f"{path}: run {run!r} was made with another recipe (differs in {', '.join(changed)}); "
                "choose another RUN or delete runs/" + run
            )
        return
    save_recipe(recipe, path, {"git_commit": git_commit()})


# -------------------------------------------------------------------------------------------------------- training
def train_fold(
    recipe: Recipe,
    data: str | Path,
    run: str,
    fold: int,
    n_folds: int = 5,
    fold_seed: int = 0,
    stop_after_epochs: int | None = None,
    until_stage: int | None = None,
) -> dict:
    """Train (or resume, or skip when finished) one fold; returns the final validation scores.

    until_stage: stop (checkpointed, resumable) before that stage starts; the LR finder sweeps a later stage so.
    stop_after_epochs: end the process after that many epochs in this call, as if it were killed (tests of resume).
    """
    out = paths.fold_dir(run, fold)
    done = out / "done.json"
    if done.exists():
        print(f"{out}: finished, nothing to do")
        return json.loads(done.read_text())
    record_recipe(recipe, run)
    fd = prepare_fold(recipe, data, run, fold, n_folds, fold_seed)
    ckpt_path = out / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    log = Progress(fd, out, ckpt["metrics"] if ckpt else [], ckpt["lrs"] if ckpt else [])
    if ckpt:
        fd.model.load_state_dict(ckpt["model"])
        set_rng_state(ckpt["rng"])
        print(f"{out}: resuming at stage {ckpt['stage']}, epoch {ckpt['epoch']} of that stage")
    for stage_i, stage in enumerate(recipe.stages):
        if until_stage is not None and stage_i >= until_stage:
            return {}
        if ckpt and stage_i < ckpt["stage"]:
            continue
        if stage.fit == "logistic":
            log.epoch_done(fit_head(fd, stage_i, len(log.metrics)), stage_i, 0, [1], None, None)
            ckpt = None
            continue
        plan = plan_stage(fd, stage_i)
        optimizer = make_optimizer(recipe, plan.opt_groups)
        warmup = round(stage.warmup * plan.steps_per_epoch)
        scheduler = make_scheduler(optimizer, plan.steps_per_epoch, stage.cycle_len, stage.cycle_mult, warmup)
        first_epoch = 0
        if ckpt and stage_i == ckpt["stage"] and ckpt["epoch"] > 0:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            first_epoch = ckpt["epoch"]
        ends = cycle_end_epochs(stage.n_cycles, stage.cycle_len, stage.cycle_mult)
        for epoch in range(first_epoch, ends[-1]):
            row = train_epoch(fd, plan, optimizer, scheduler, stage_i, stage, len(log.metrics), log.lrs)
            log.epoch_done(row, stage_i, epoch, ends, optimizer, scheduler)
            if stop_after_epochs is not None and log.epochs_this_call >= stop_after_epochs:
                raise KeyboardInterrupt  # what a kill between two epochs looks like
        ckpt = None
    save_atomic(fd.model.state_dict(), out / "final.pt")
    plot_fold(out)
    final = {k: log.metrics[-1][k] for k in ("val_loss", "val_f1", "val_macro_f1")}
    final["seconds"] = float(sum(m["seconds"] for m in log.metrics))
    done.write_text(json.dumps(final, indent=1))
    return final


@dataclass
class Progress:
    """A fold's metrics and LR rows, and what is written after every epoch: snapshot, checkpoint, CSVs."""

    fd: Fold
    out: Path
    metrics: list[dict]
    lrs: list[dict]
    epochs_this_call: int = 0

    def epoch_done(self, row: dict, stage_i: int, epoch: int, ends: list[int], optimizer, scheduler) -> None:
        """epoch: 0-based within the stage; ends: the stage's cycle-end epochs (1-based)."""
        self.metrics.append(row)
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        state = self.fd.model.state_dict()
        if self.fd.recipe.snapshots and epoch + 1 in ends:
            save_atomic(state, self.out / "snapshots" / f"stage{stage_i}-cycle{ends.index(epoch + 1)}.pt")
        at_stage_end = epoch + 1 == ends[-1]
        # at a stage's end the next stage starts with a new optimizer: nothing of this one is kept
        save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "model": state,
                "optimizer": None if at_stage_end else optimizer.state_dict(),
                "scheduler": None if at_stage_end else scheduler.state_dict(),
                "stage": stage_i + 1 if at_stage_end else stage_i,
                "epoch": 0 if at_stage_end else epoch + 1,
                "rng": rng_state(),
                "metrics": self.metrics,
                "lrs": self.lrs,
            },
            self.out / "checkpoint.pt",
        )
        write_csv(self.metrics, self.out / "metrics.csv")
        if self.lrs:
            write_csv(self.lrs, self.out / "lrs.csv")
        self.epochs_this_call += 1


@torch.no_grad()
def fit_head(fd: Fold, stage_i: int, epoch: int) -> dict:
    """A `fit: logistic` stage: the classifier solved on the precomputed features (the linear probe, converged, its L2
    strength chosen by cross-validated log loss on the fold's training images); one row of metrics.csv."""
    from seedlings.baseline import fit_logistic

    start = time.perf_counter()
    stage, head = fd.recipe.stages[stage_i], fd.model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise UserError(f"stages.{stage_i}.fit: logistic needs a linear classifier, {fd.recipe.model} has {head}")
    feats = features_for(fd, stage_i)
    x_train, y_train = feats[fd.train_idx].mean(1).numpy(), fd.labels[fd.train_idx]  # views averaged
    c = fd.recipe.head_c or None
    fit = fit_logistic(x_train, y_train, len(fd.comp.classes), c, fd.recipe.seed, scoring="neg_log_loss")
    head.weight.copy_(torch.from_numpy(fit.weight))
    head.bias.copy_(torch.from_numpy(fit.bias))
    train_probs = torch.from_numpy(fit.logits(x_train)).softmax(-1).numpy()
    val_probs = torch.from_numpy(fit.logits(feats[fd.val_idx, 0].numpy())).softmax(-1).numpy()
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch + 1,
        "stage": stage_i,
        "size": stage.size,
        "train_loss": scores(train_probs, y_train)["val_loss"],
        **scores(val_probs, fd.labels[fd.val_idx]),
        "lr": 0.0,
        "seconds": seconds,
        "images_per_s": len(y_train) / seconds,
        "head_c": fit.c,
    }


def train_epoch(
    fd: Fold, plan: StagePlan, optimizer, scheduler, stage_i: int, stage: Stage, epoch: int, lr_rows: list[dict]
) -> dict:
    """One pass over the training batches, then the validation scores: one row of metrics.csv."""
    r = fd.recipe
    criterion = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
    plan.set_modes()
    start, seen, total_loss = time.perf_counter(), 0, 0.0
    bar = tqdm(
        plan.batches(epoch),
        total=plan.steps_per_epoch,
        desc=f"fold {fd.fold} epoch {epoch + 1}",
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
                **{f"lr_g{g}": lrs.get(g, 0.0) for g in range(r.layer_groups)},
            }
        )
        x, y = to_device(fd, x), y.to(fd.device, non_blocking=True)
        with autocast(fd):
            loss = criterion(plan.forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen += len(y)
        total_loss += loss.item() * len(y)
        bar.set_postfix(
            loss=f"{total_loss / seen:.3f}",
            lr=f"{lrs.get(r.layer_groups - 1, 0):.2e}",
            img_s=f"{seen / (time.perf_counter() - start):.0f}",
        )
    train_seconds = time.perf_counter() - start
    val = scores(plan.val_probs(), fd.labels[fd.val_idx])
    return {
        "epoch": epoch + 1,
        "stage": stage_i,
        "size": stage.size,
        "train_loss": total_loss / max(seen, 1),
        **val,
        "lr": lr_rows[-1][f"lr_g{r.layer_groups - 1}"] if lr_rows else 0.0,
        "seconds": time.perf_counter() - start,
        "images_per_s": seen / train_seconds,
    }


def plot_fold(out: Path) -> None:
    """loss.png (train/val loss and val micro-F1 per epoch) and lr.png (every step's LR per group)."""
    import matplotlib

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
    fig.savefig(out / "loss.png", dpi=90)
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
    fig.savefig(out / "lr.png", dpi=90)
    plt.close(fig)
