"""A fold's own curves beside its CSVs: loss.png (train and validation loss, validation F1 per epoch, each stage
marked) and lr.png (every step's learning rate per layer group)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from seedlings import paths
from seedlings.recipe.schema import SOLVED_HEAD
from seedlings.storage import pyplot, save_figure


def train_label(recipe) -> str:
    """What the training loss was computed against: the labels, smoothed or mixed as the recipe says."""
    how = [f"labels smoothed {recipe.label_smoothing:g}"] if recipe.label_smoothing else []
    how += [f"{name} {alpha:g}" for name, alpha in (("mixup", recipe.mixup_alpha), ("cutmix", recipe.cutmix_alpha))
            if alpha]  # fmt: skip
    return "train" + (f" ({', '.join(how)})" if how else "")


def plot_fold(out: Path, recipe) -> None:
    """loss.png (train/val loss and val micro-F1 per epoch) and lr.png (every step's LR per group); none where
    matplotlib is not installed (a bare GPU machine): the CSVs hold the same numbers. Validation is drawn as points,
    joined only between epochs next to each other that were both scored (validate: cycle scores a cycle's last epoch);
    a solved head's row (no epochs: a fit on features) is a square of its own; a dotted line where a stage starts."""
    try:
        plt = pyplot()
    except ImportError:
        return

    m = pd.read_csv(out / paths.METRICS)
    head = m.stage.map(lambda k: recipe.stages[k].kind == SOLVED_HEAD)
    trained = m[~head]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(trained.epoch, trained.train_loss, "o-", ms=3, label=train_label(recipe))
    ax[0].plot(m.epoch, m.val_loss, "o-", ms=4, label="validation")  # a NaN (not scored) breaks the line
    ax[1].plot(m.epoch, m.val_f1, "o-", ms=4, label="micro-F1")
    ax[1].plot(m.epoch, m.val_macro_f1, "o-", ms=4, label="macro-F1")
    if head.any():
        solved = m[head]
        ax[0].plot(solved.epoch, solved.train_loss, "s", color="grey", label="solved head (train, on features)")
    for start in m.groupby("stage").epoch.min().iloc[1:]:
        for a in ax:
            a.axvline(start - 0.5, color="grey", linestyle=":", linewidth=1)
    ax[0].set(xlabel="epoch", ylabel="loss")
    ax[1].set(xlabel="epoch", ylabel="validation F1")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / paths.LOSS_PLOT, dpi=90)
    plt.close(fig)
    if not (out / paths.LRS).exists():  # only solved stages: no learning rates to show
        return
    lr = pd.read_csv(out / paths.LRS)
    fig, ax = plt.subplots(figsize=(7, 3))
    for c in [c for c in lr.columns if c.startswith("lr_g")]:
        ax.plot(lr.step, lr[c], label=c[3:])
    ax.set(xlabel="step", ylabel="learning rate", yscale="log")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / paths.LR_PLOT, dpi=90)
    plt.close(fig)
