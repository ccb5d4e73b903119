"""A fold's checkpoint (written after every epoch, off the training thread) and its resumption: weights, optimizer,
scheduler, RNG state, position, and the metrics and learning rates so far."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from seedlings import paths
from seedlings.errors import UserError
from seedlings.storage import (
    BackgroundSaver,
    cpu_copy,
    file_sha256,
    load_torch,
    read_json,
    save_torch,
    write_csv,
    write_json,
)
from seedlings.train.callbacks import weights_read
from seedlings.train.fold import FoldContext

CHECKPOINT_FORMAT = "seedlings-checkpoint-1"


def load_checkpoint(path, owner: str | None = None) -> dict:
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


def resume_from_checkpoint(ctx: FoldContext) -> dict | None:
    """The fold's checkpoint, its weights and RNG state already restored; None when the fold starts afresh."""
    path = ctx.dir / paths.CHECKPOINT
    if not path.exists():
        return None
    ckpt = load_checkpoint(path, checkpoint_owner(ctx))
    ctx.model.load_state_dict(ckpt["model"])
    set_rng_state(ckpt["rng"])
    print(f"{ctx.dir}: resuming at stage {ckpt['stage']}, epoch {ckpt['epoch']} of that stage")
    threads = ckpt.get("threads")
    if threads and threads != torch.get_num_threads():  # CPU results depend on the thread count: keep the fold's own
        print(f"{ctx.dir}: trained with {threads} CPU threads so far: resuming with them")
        torch.set_num_threads(threads)
    return ckpt


def record_weights(fold_dir: Path, weights: Path) -> None:
    """weights.json: the sha256 of each weights file the fold saved (snapshots, final.pt), which predict checks: a
    file copied from another run or damaged since is refused, not predicted with."""
    record = fold_dir / paths.WEIGHTS
    saved = json.loads(record.read_text()) if record.exists() else {}
    write_json(record, {**saved, weights.name: file_sha256(weights)})


def recorded_weights(fold_dir: Path, weights: Path, owner: str, redo: str, device="cpu") -> dict:
    """The state dict in `weights`, checked against the sha256 its fold (`owner`: "fold k of run 'x'") recorded in
    weights.json when it saved it: a missing, damaged or copied file exits 2 naming it and `redo`, the command that
    repairs it."""
    if not weights.exists():
        raise UserError(f"{weights}: weights of {owner} missing; {redo}")
    record = fold_dir / paths.WEIGHTS
    if record.exists():
        saved = read_json(record, "record of the fold's weights", redo).get(weights.name)
        if saved != file_sha256(weights):
            raise UserError(f"{weights}: not the weights {owner} saved (copied from another run, or damaged); {redo}")
    return load_torch(weights, f"weights of {owner}", device)


@dataclass
class FoldLog:
    """A fold's metrics and LR rows, and what is written after every epoch: snapshot, checkpoint, CSVs."""

    ctx: FoldContext
    metrics: list[dict]
    lrs: list[dict]
    saver: BackgroundSaver = field(default_factory=BackgroundSaver)

    def epoch_done(self, row: dict, stage_i: int, epoch: int, ends: list[int], optimizer, scheduler,
                   extras: Sequence = ()) -> None:  # fmt: skip
        """epoch: 0-based within the stage; ends: the stage's cycle-end epochs (1-based); extras: the stage's callbacks
        (a snapshot holds the weights they have validation read, the average; at the stage's end the model already
        does), each one's state checkpointed under its key. Snapshots and the checkpoint are host copies written off
        the training thread (resume stays exact: they are the state now)."""
        self.metrics.append(row)
        out, state = self.ctx.dir, cpu_copy(self.ctx.model.state_dict())
        at_stage_end = epoch + 1 == ends[-1]
        if self.ctx.recipe.snapshots and epoch + 1 in ends:
            snapshot = self.ctx.run.snapshot_path(self.ctx.fold, stage_i, ends.index(epoch + 1))
            weights = state
            if extras and not at_stage_end:
                with weights_read(extras):
                    weights = cpu_copy(self.ctx.model.state_dict())
            record_weights(out, save_torch(snapshot, weights))
        # at a stage's end the next stage starts with a new optimizer: nothing of this one is kept
        self.saver.save(
            out / paths.CHECKPOINT,
            {
                "format": CHECKPOINT_FORMAT,
                "owner": checkpoint_owner(self.ctx),
                "model": state,
                "optimizer": None if at_stage_end else cpu_copy(optimizer.state_dict()),
                "scheduler": None if at_stage_end else cpu_copy(scheduler.state_dict()),
                **{extra.key: None if at_stage_end else extra.state_dict() for extra in extras},  # average, scaler
                "stage": stage_i + 1 if at_stage_end else stage_i,
                "epoch": 0 if at_stage_end else epoch + 1,
                "rng": rng_state(),
                "threads": torch.get_num_threads(),
                "metrics": list(self.metrics),
                "lrs": list(self.lrs),
            },
        )
        write_csv(out / paths.METRICS, pd.DataFrame(self.metrics))
        if self.lrs:
            write_csv(out / paths.LRS, pd.DataFrame(self.lrs))
