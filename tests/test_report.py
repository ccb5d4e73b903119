"""report.md says what the blend's probabilities say: micro-F1, per-class F1 and counts, folds, members, mistakes."""

import numpy as np

from conftest import tiny_recipe
from seedlings.data.competition import scan_competition
from seedlings.predict.members import Probs
from seedlings.predict.report import write_report
from seedlings.run import Run


def test_report_contents_follow_the_probabilities(demo_master, home):
    comp = scan_competition(demo_master)
    labels = np.array(comp.train_labels)
    n, k = len(labels), len(comp.classes)
    pred = labels.copy()
    wrong = list(np.flatnonzero(labels == 0)[[0, 2, 3]])  # three mistakes, all of class 0 predicted as class 1
    pred[wrong] = 1
    values = np.full((n, k), 0.01, np.float32)
    values[np.arange(n), pred] = 1 - 0.01 * (k - 1)
    oof = Probs(values, comp.train_files, comp.classes)
    run = Run("rep", demo_master, tiny_recipe())
    table = {
        "rep/final": {"micro_f1": 0.5, "log_loss": 1.25, "weight": 1.0},
        "blend": {"micro_f1": 0.5, "log_loss": 1.25, "weight": 1.0},
    }
    path = write_report(run, comp, oof, labels, table)
    text = path.read_text()
    assert f"micro-F1 {(n - 3) / n:.4f} over {n} images" in text
    n0, n1 = int((labels == 0).sum()), int((labels == 1).sum())
    f1_class0 = 2 * (n0 - 3) / (2 * (n0 - 3) + 3)  # precision 1, recall (n0 - 3) / n0
    f1_class1 = 2 * n1 / (2 * n1 + 3)  # recall 1, precision n1 / (n1 + 3)
    assert f"| {comp.classes[0]} | {f1_class0:.3f} | {n0} |" in text
    assert f"| {comp.classes[1]} | {f1_class1:.3f} | {n1} |" in text
    assert "| rep/final | 0.5000 | 1.2500 | 1.000 |" in text
    worst = text.split("## Worst out-of-fold images")[1]
    assert [line.split("`")[1] for line in worst.splitlines() if line.startswith("- `")][:3] == [
        comp.train_files[i] for i in wrong
    ]
    for png in ("classes.png", "confusion.png", "worst.png"):
        assert (path.parent / png).stat().st_size > 1000
