"""A fold's own curves beside its CSVs: loss.png (train and validation loss, validation F1 per epoch) and lr.png (every
step's learning rate per layer group)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from seedlings.storage import pyplot, save_figure


def plot_fold(out: Path) -> None:
    """loss.png (train/val loss and val micro-F1 per epoch) and lr.png (every step's LR per group); none where
    matplotlib is not installed (a bare GPU machine): the CSVs hold the same numbers."""
    try:
        plt = pyplot()
    except ImportError:
        return

    m = pd.read_csv(out / "metrics.csv")
    scored = m.dropna(subset=["val_loss"])  # validate: cycle scores the cycles' last epochs only
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(m.epoch, m.train_loss, "o-", label="train (smoothed targets)")
    ax[0].plot(scored.epoch, scored.val_loss, "o-", label="validation")
    ax[0].set(xlabel="epoch", ylabel="loss")
    ax[0].legend()
    ax[1].plot(scored.epoch, scored.val_f1, "o-", label="micro-F1")
    ax[1].plot(scored.epoch, scored.val_macro_f1, "o-", label="macro-F1")
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
