"""What attaches to a fold's loop, in fastai's manner (its `Callback`), at two levels. A fold callback is told after
the solved head and each epoch, when the fold is done and when it stops early: MLflow's tracking (track/mlflow.py's
FoldTracking) and a caller's epoch hook (a sweep's pruner). A stage callback lives for one stage of steps: the weight
average (average.py, timm's --model-ema as one object) and fp16's gradient scaler (precision.py's StepScaler), told
after every step and at the stage's end, adding to each epoch's row, holding the weights that validation and snapshots
read, and keeping its state in the fold's checkpoint. `fit_fold` reads as the loop alone. Each method does nothing
unless an object defines it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class FoldCallback(Protocol):
    scores_every_epoch: bool  # the callback reads every epoch's validation scores (under `validate: cycle` too)

    def after_solved_head(self, row: dict) -> None:
        """The solved head's row (a fit on features: no epoch of steps, so no pruner reads it), once written."""

    def after_epoch(self, row: dict) -> None:
        """The epoch's metrics row, once its checkpoint is written."""

    def after_fold(self, final: dict, fold_dir: Path) -> None:
        """The fold's final scores, once done.json is written."""

    def stopped(self) -> None:
        """The fold ended early: pruned, interrupted or failed (a resume goes on later)."""


class StageCallback(Protocol):
    key: str  # its state's name in the fold's checkpoint

    def after_step(self) -> None:
        """After every optimizer step of the stage."""

    def after_stage(self) -> None:
        """The stage's last epoch trained, before it is validated."""

    def after_epoch(self, row: dict) -> None:
        """The epoch's metrics row, before it is written: a callback adds its own columns."""

    def weights_read(self) -> contextlib.AbstractContextManager:
        """A block within which the model holds the weights validation and a snapshot read."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def stage_callbacks(ctx, optimizer) -> list[StageCallback]:
    """What a stage of steps attaches: the weight average (recipe key `ema`), fp16's gradient scaler."""
    from seedlings.precision import StepScaler
    from seedlings.train.average import WeightAverage

    average = [WeightAverage(ctx.model, optimizer, ctx.recipe.ema)] if ctx.recipe.ema else []
    return average + ([StepScaler(ctx.device)] if ctx.precision.scaled else [])


def weights_read(callbacks: Sequence) -> contextlib.ExitStack:
    """A block within which the model holds what every callback has validation read (the average); as trained else."""
    stack = contextlib.ExitStack()
    for callback in callbacks:
        if hasattr(callback, "weights_read"):
            stack.enter_context(callback.weights_read())
    return stack


def step_owner(callbacks: Sequence):
    """The callback that takes the optimizer's step itself (fp16's scaler: a scaled backward, a step skipped on an
    overflow), or None: a plain backward and step."""
    return next((c for c in callbacks if hasattr(c, "step")), None)


@dataclass
class EpochHook:
    """A function called with each epoch's row (a sweep reports the score to its pruner there, which may stop the
    fold by raising)."""

    fn: Callable[[dict], None]
    scores_every_epoch: bool = True

    def after_epoch(self, row: dict) -> None:
        self.fn(row)


def notify(callbacks: Sequence, event: str, *args) -> None:
    """Call `event` on every callback that defines it, in order."""
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(*args)


def scores_every_epoch(callbacks: Sequence) -> bool:
    return any(getattr(callback, "scores_every_epoch", False) for callback in callbacks)
