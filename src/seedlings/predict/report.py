"""runs/<run>/report/report.md and its PNGs: data, LR finder, training curves, confusion, per-class F1, blend,
mistakes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score

from seedlings import paths
from seedlings.data.competition import Competition, read_image
from seedlings.metrics import micro_f1
from seedlings.run import Run
from seedlings.storage import Probs, pyplot, save_figure, write_text


def write_report(
    run: Run, comp: Competition, oof: Probs, labels: np.ndarray, table: dict, skipped: dict | None = None
) -> Path:
    """report.md from the blend's out-of-fold probabilities (`labels`: the true class of each of `oof.files`), its
    member table, the folds' metrics and the images skipped as unreadable; returns its path."""
    out = run.dir / paths.REPORT
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Run `{run.name}`", ""]
    lines += data_section(comp, out)
    sweeps = sorted(run.dir.glob("lr_find-stage*.png"))
    if sweeps:
        lines += ["## LR finder", "", *[f"![{p.stem}](../{p.name})" for p in sweeps], ""]
    lines += training_section(run)
    lines += oof_section(oof, labels, out)
    lines += ["## Blend", "", "| member | OOF micro-F1 | OOF log loss | weight |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['micro_f1']:.4f} | {v['log_loss']:.4f} | {v['weight']:.3f} |" for k, v in table.items()]
    lines.append("")
    lines += worst_section(comp, oof, labels, out, n_worst=12)
    for split, files in (skipped or {}).items():
        if files:
            lines += [f"## Unreadable {split} images (skip_bad_images)", "", *[f"- `{f}`" for f in files], ""]
    if comp.ignored:
        lines += ["## Subfolders not read", "", *[f"- `{s}`" for s in comp.ignored], ""]
    return write_text(out / paths.REPORT_MD, "\n".join(lines))


def data_section(comp: Competition, out: Path) -> list[str]:
    plt = pyplot()
    counts = pd.Series(comp.train_labels).value_counts().sort_index()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([comp.classes[i] for i in counts.index], counts.values)
    ax.set(xlabel="training images", title=f"{len(comp.train_files)} training, {len(comp.test_files)} test images")
    fig.tight_layout()
    save_figure(fig, out / "classes.png", dpi=80)
    plt.close(fig)
    return ["## Data", "", "![classes](classes.png)", ""]


def training_section(run: Run) -> list[str]:
    lines = ["## Training", "", "| fold | epochs | val micro-F1 | val loss | train seconds |", "|---|---|---|---|---|"]
    trained = [k for k in range(run.n_folds + 1) if (run.fold_dir(k) / paths.METRICS).exists()]  # + the full fit
    for k in trained:
        m = pd.read_csv(run.fold_dir(k) / paths.METRICS)
        last = m.iloc[-1]
        which = "all images" if k == run.full else k
        lines.append(f"| {which} | {len(m)} | {last.val_f1:.4f} | {last.val_loss:.4f} | {m.seconds.sum():.0f} |")
    return [*lines, "", *[f"![{run.fold_dir(k).name}](../{run.fold_dir(k).name}/loss.png)" for k in trained], ""]


def oof_section(oof: Probs, labels: np.ndarray, out: Path) -> list[str]:
    """The blend's out-of-fold confusion matrix and per-class F1."""
    plt, classes = pyplot(), oof.classes
    pred = oof.values.argmax(1)
    cm = confusion_matrix(labels, pred, labels=range(len(classes)))
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(cm, cmap="Blues")
    for i, j in zip(*np.nonzero(cm)):
        colour = "white" if cm[i, j] > cm.max() / 2 else "black"
        ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="out-of-fold confusion (blend)")
    fig.tight_layout()
    save_figure(fig, out / "confusion.png", dpi=80)
    plt.close(fig)
    per_class = f1_score(labels, pred, average=None, labels=range(len(classes)))
    lines = ["## Out-of-fold results (blend)", "", f"micro-F1 {micro_f1(labels, pred):.4f} over {len(labels)} images"]
    lines += ["", "![confusion](confusion.png)", "", "| species | F1 | images |", "|---|---|---|"]
    lines += [f"| {c} | {f:.3f} | {int((labels == i).sum())} |" for i, (c, f) in enumerate(zip(classes, per_class))]
    return [*lines, ""]


def worst_section(comp: Competition, oof: Probs, labels: np.ndarray, out: Path, n_worst: int) -> list[str]:
    """The training images the blend gave the lowest probability of their true species."""
    plt, classes = pyplot(), oof.classes
    p_true = oof.values[np.arange(len(labels)), labels]
    pred = oof.values.argmax(1)
    worst = np.argsort(p_true, kind="stable")[:n_worst]
    cols = 4  # wide enough for the longest species' name in full ("Small-flowered Cranesbill")
    rows = -(-len(worst) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        ax.imshow(read_image(comp.train_path(oof.files[i])))
        ax.set_title(f"{classes[labels[i]]}\nas {classes[pred[i]]}\np(true) {p_true[i]:.2f}", fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "worst.png", dpi=80)
    plt.close(fig)
    lines = ["## Worst out-of-fold images", "", "true species, predicted species, probability of the true one", ""]
    listed = [f"- `{oof.files[i]}`: {classes[labels[i]]} as {classes[pred[i]]}, p={p_true[i]:.3f}" for i in worst]
    return [*lines, "![worst](worst.png)", "", *listed, ""]
