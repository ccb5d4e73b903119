"""The bar a fine-tune must clear: logistic regression on the frozen backbone's pooled features (a linear probe)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from seedlings.config import Recipe
from seedlings.train import pooled_features, prepare_fold


def linear_probe(
    recipe: Recipe, data: str | Path, fold: int, size: int, n_folds: int = 5, fold_seed: int = 0, c: float = 0.5
) -> dict:
    """Micro-F1 on the fold's validation images of a logistic regression on pooled features at `size` px."""
    start = time.perf_counter()
    # the cache must hold at least size x 1.15 px, like any training size
    recipe = dataclasses.replace(recipe, cache_margin=max(recipe.cache_margin, size * 1.15 / recipe.max_size))
    fd = prepare_fold(recipe, data, "probe", fold, n_folds, fold_seed)
    feats = pooled_features(fd, size, np.arange(len(fd.labels)), d4=False)[:, 0].numpy()
    scaler = StandardScaler().fit(feats[fd.train_idx])
    clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(feats[fd.train_idx]), fd.labels[fd.train_idx])
    pred = clf.predict(scaler.transform(feats[fd.val_idx]))
    return {
        "size": size,
        "val_f1": float(f1_score(fd.labels[fd.val_idx], pred, average="micro")),
        "seconds": time.perf_counter() - start,
    }
