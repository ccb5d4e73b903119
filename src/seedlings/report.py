"""runs/<run>/report.md and its PNGs: data, LR finder, training curves, confusion, per-class F1, blend, mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score

from seedlings import paths
from seedlings.images import read_image, scan_competition


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(run: str, data: str | Path, n_worst: int = 12) -> Path:
    """Reads the run's files (folds' metrics, oof_blend.csv, the submission's provenance); writes report.md."""
    plt = _plt()
    out = paths.run_dir(run) / "report"
    out.mkdir(parents=True, exist_ok=True)
    comp = scan_competition(data)
    oof = pd.read_csv(paths.run_dir(run) / "oof_blend.csv")
    classes = comp.classes
    lines = [f"# Run `{run}`", ""]

    counts = pd.Series(comp.train_labels).value_counts().sort_index()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([classes[i] for i in counts.index], counts.values)
    ax.set(xlabel="training images", title=f"{len(comp.train_files)} training, {len(comp.test_files)} test images")
    fig.tight_layout()
    fig.savefig(out / "classes.png", dpi=80)
    plt.close(fig)
    lines += ["## Data", "", "![classes](classes.png)", ""]

    if (paths.run_dir(run) / "lr_find.png").exists():
        lines += ["## LR finder", "", "![lr finder](../lr_find.png)", ""]

    lines += ["## Training", "", "| fold | epochs | val micro-F1 | val loss | train seconds |", "|---|---|---|---|---|"]
    folds = sorted(p for p in paths.run_dir(run).glob("fold*") if (p / "metrics.csv").exists())
    for f in folds:
        m = pd.read_csv(f / "metrics.csv")
        lines.append(
            f"| {f.name[4:]} | {len(m)} | {m.val_f1.iloc[-1]:.4f} | {m.val_loss.iloc[-1]:.4f} | {m.seconds.sum():.0f} |"
        )
    lines.append("")
    lines += [f"![{f.name}](../{f.name}/loss.png)" for f in folds] + [""]

    y_true = oof.species.map(classes.index).to_numpy()
    y_pred = oof.pred.map(classes.index).to_numpy()
    cm = confusion_matrix(y_true, y_pred, labels=range(len(classes)))
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(cm, cmap="Blues")
    for i, j in np.ndindex(cm.shape):
        if cm[i, j]:
            ax.text(
                j,
                i,
                cm[i, j],
                ha="center",
                va="center",
                fontsize=7,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="out-of-fold confusion (blend)")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=80)
    plt.close(fig)
    per_class = f1_score(y_true, y_pred, average=None, labels=range(len(classes)))
    lines += [
        "## Out-of-fold results (blend)",
        "",
        f"micro-F1 {np.mean(y_true == y_pred):.4f} over {len(oof)} images",
        "",
        "![confusion](confusion.png)",
        "",
        "| species | F1 | images |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {f:.3f} | {int((y_true == i).sum())} |" for i, (c, f) in enumerate(zip(classes, per_class))]
    lines.append("")

    prov = paths.submissions_dir() / f"{run}.json"
    if prov.exists():
        members = json.loads(prov.read_text())["members"]
        lines += ["## Blend", "", "| member | OOF micro-F1 | OOF log loss | weight |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {v['micro_f1']:.4f} | {v['log_loss']:.4f} | {v['weight']:.3f} |" for k, v in members.items()
        ]
        lines.append("")

    p_true = oof[classes].to_numpy()[np.arange(len(oof)), y_true]
    worst = np.argsort(p_true)[:n_worst]
    cols = 6
    rows = -(-len(worst) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2, rows * 2.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        ax.imshow(read_image(comp.train_path(oof.file[i])))
        ax.set_title(f"{oof.species[i][:14]}\nas {oof.pred[i][:14]} p={p_true[i]:.2f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "worst.png", dpi=80)
    plt.close(fig)
    lines += [
        "## Worst out-of-fold images",
        "",
        "true species, predicted species, probability of the true one",
        "",
        "![worst](worst.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
