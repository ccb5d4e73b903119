"""The scores every table uses: micro-F1 (the competition metric; single-label, so it equals accuracy), macro-F1 and
log loss, computed one way."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

PROB_FLOOR = 1e-15  # probabilities are clipped here before the log: one confident mistake costs 34.5, not infinity


def micro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    return float(f1_score(labels, pred, average="micro"))


def macro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    return float(f1_score(labels, pred, average="macro"))


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log probability of the true class (plain cross-entropy; rows are assumed to sum to 1)."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], PROB_FLOOR, None)).mean())


def val_scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """A fold's validation row: loss, micro-F1, macro-F1 (metrics.csv's columns)."""
    pred = probs.argmax(1)
    return {
        "val_loss": log_loss(probs, labels),
        "val_f1": micro_f1(labels, pred),
        "val_macro_f1": macro_f1(labels, pred),
    }
