"""What attaches to a fold's loop, in fastai's manner (its `Callback`): an object told after the solved head and each
epoch, when the fold is done and when it stops early. `fit_fold` reads as the loop alone; MLflow's tracking
(track/mlflow.py's FoldTracking) and a caller's epoch hook (a sweep's pruner) attach as callbacks. Each method does
nothing unless an object defines it."""

from __future__ import annotations

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
