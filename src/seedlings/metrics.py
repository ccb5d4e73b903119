"""The scores every table uses: micro-F1 (the competition metric; single-label, so it equals accuracy), macro-F1 and
log loss, computed one way."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score

PROB_FLOOR = 1e-15  # probabilities are clipped here before the log: one confident mistake costs 34.5, not infinity


def micro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    return float(f1_score(labels, pred, average="micro"))


def macro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    return float(f1_score(labels, pred, average="macro"))


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log probability of the true class (plain cross-entropy; rows are assumed to sum to 1)."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], PROB_FLOOR, None)).mean())


VAL_KEYS = ("val_loss", "val_f1", "val_macro_f1")  # a fold's validation scores: metrics.csv's and done.json's names
NO_VALIDATION = dict.fromkeys(VAL_KEYS, float("nan"))  # an epoch not scored, or a model with no validation images


def val_scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """A fold's validation row: loss, micro-F1, macro-F1 (metrics.csv's columns)."""
    pred = probs.argmax(1)
    return dict(zip(VAL_KEYS, (log_loss(probs, labels), micro_f1(labels, pred), macro_f1(labels, pred))))


def geometric_mean(p: torch.Tensor) -> torch.Tensor:
    g = torch.exp(torch.log(p.clamp_min(PROB_FLOOR)).mean(0))
    return g / g.sum(-1, keepdim=True)  # renormalised to sum to 1


MEANS = {"arith": lambda p: p.mean(0), "geom": geometric_mean}  # the `tta_mean` choices


def pair_confusion(labels: np.ndarray, pred: np.ndarray, classes: list[str], pair: tuple[str, str]) -> dict:
    """How two classes are taken for each other: the 2x2 counts among the images of either (true class by rows,
    predicted by columns; a prediction outside the pair counts in neither column), and the errors between the two
    against all errors."""
    a, b = (classes.index(c) for c in pair)
    counts = [[int(((labels == t) & (pred == p)).sum()) for p in (a, b)] for t in (a, b)]
    return {"pair": list(pair), "counts": counts, "pair_errors": counts[0][1] + counts[1][0],
            "errors": int((labels != pred).sum()), "images": int(np.isin(labels, (a, b)).sum())}  # fmt: skip
