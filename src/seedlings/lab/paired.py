"""A paired verdict: two chains' out-of-fold predictions of the same images on the same folds, for each fold seed,
compared image by image. The difference in micro-F1 and in log loss with a bootstrap interval that resamples the
images (and the fold seeds), McNemar's exact test on the images one gets right and the other wrong, and each class's
errors. One verdict word, from the micro-F1 interval: better, worse, or within noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from seedlings.metrics import PROB_FLOOR

BOOTSTRAP = 4000  # resamples: the 2.5 and 97.5 percentiles move by under a tenth of a point between two seeds
LEVEL = 0.95  # the interval's coverage
BOOTSTRAP_SEED = 0  # the resamples are drawn the same way every time: a study resumed prints the same table


@dataclass(frozen=True)
class Arm:
    """One chain's out-of-fold predictions on one fold seed: probabilities (images x classes) and the true classes,
    rows in `files` order."""

    files: list[str]
    probs: np.ndarray
    labels: np.ndarray

    @property
    def right(self) -> np.ndarray:
        return self.probs.argmax(1) == self.labels

    @property
    def losses(self) -> np.ndarray:
        """Each image's negative log probability of its class (the log loss is their mean)."""
        return -np.log(np.clip(self.probs[np.arange(len(self.labels)), self.labels], PROB_FLOOR, None))


def aligned(base: Arm, variant: Arm) -> tuple[Arm, Arm]:
    """Both arms on the images both predicted out of fold, in the base's order. On one split they differ only where
    one chain trains more of its folds (train_folds): the images of the folds both trained are compared. None in
    common is a ValueError: the chains are not on the same folds."""
    row = {f: i for i, f in enumerate(variant.files)}
    keep = [i for i, f in enumerate(base.files) if f in row]
    if not keep:
        raise ValueError("the two chains predicted no image in common out of fold: not on the same folds")
    order = [row[base.files[i]] for i in keep]
    files = [base.files[i] for i in keep]
    return Arm(files, base.probs[keep], base.labels[keep]), Arm(files, variant.probs[order], variant.labels[order])


def bootstrap_interval(diffs: np.ndarray, present: np.ndarray, n: int = BOOTSTRAP,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:  # fmt: skip
    """The LEVEL percentile interval of the mean difference over resamples that draw the images with replacement (one
    draw for every fold seed: an image hard on one split is hard on another) and the fold seeds with replacement (the
    spread between splits is part of the noise). diffs, present: (seeds, images), present 0 where a seed's chains did
    not predict that image out of fold (folds they did not train); each seed's mean is over its own images."""
    n_seeds, n_images = diffs.shape
    rng = np.random.default_rng(seed)
    image_counts = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=n)  # (n, images)
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n)  # (n, seeds)
    drawn = np.maximum(image_counts @ present.T, 1)  # (n, seeds): each seed's images drawn
    per_seed = image_counts @ (diffs * present).T / drawn
    means = (per_seed * seed_counts).sum(1) / n_seeds
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar(base_right: np.ndarray, variant_right: np.ndarray) -> dict:
    """McNemar's exact test: of the images exactly one of the two gets right, how many each gets, and the two-sided
    binomial p-value of a split that uneven if either were as likely."""
    base_only = int((base_right & ~variant_right).sum())
    variant_only = int((~base_right & variant_right).sum())
    changed = base_only + variant_only
    p = binomtest(min(base_only, variant_only), changed, 0.5).pvalue if changed else 1.0
    return {"base_only": base_only, "variant_only": variant_only, "p": float(p)}


def verdict_word(low: float, high: float) -> str:
    """better or worse when the whole micro-F1 interval is on one side of 0; else within noise."""
    return "better" if low > 0 else "worse" if high < 0 else "within noise"


def paired_verdict(bases: list[Arm], variants: list[Arm], classes: list[str]) -> dict:
    """The comparison of a variant with its base, one Arm of each per fold seed (the same folds), on the images both
    predicted out of fold."""
    pairs = [aligned(b, v) for b, v in zip(bases, variants, strict=True)]
    union = sorted({f for b, _ in pairs for f in b.files})
    column = {f: i for i, f in enumerate(union)}
    f1, loss, present = (np.zeros((len(pairs), len(union))) for _ in range(3))
    for s, (b, v) in enumerate(pairs):
        cols = [column[f] for f in b.files]
        f1[s, cols] = v.right.astype(float) - b.right  # +1: only the variant right, -1: only the base
        loss[s, cols] = v.losses - b.losses
        present[s, cols] = 1

    def mean(values: list[np.ndarray]) -> float:  # each fold seed weighs the same
        return float(np.mean([x.mean() for x in values]))

    base_right = np.concatenate([b.right for b, _ in pairs])
    variant_right = np.concatenate([v.right for _, v in pairs])
    labels = np.concatenate([b.labels for b, _ in pairs])
    errors = {c: (int((~base_right & (labels == i)).sum()), int((~variant_right & (labels == i)).sum()))
              for i, c in enumerate(classes)}  # fmt: skip
    f1_ci = bootstrap_interval(f1, present)
    return {
        "seeds": len(pairs),
        "images": int(labels.size),  # predictions compared: images x fold seeds
        "base_f1": mean([b.right for b, _ in pairs]),
        "variant_f1": mean([v.right for _, v in pairs]),
        "delta_f1": mean([v.right.astype(float) - b.right for b, v in pairs]),
        "delta_f1_ci": f1_ci,
        "base_log_loss": mean([b.losses for b, _ in pairs]),
        "variant_log_loss": mean([v.losses for _, v in pairs]),
        "delta_log_loss": mean([v.losses - b.losses for b, v in pairs]),
        "delta_log_loss_ci": bootstrap_interval(loss, present),
        "mcnemar": mcnemar(base_right, variant_right),
        "mcnemar_per_seed": [mcnemar(b.right, v.right) for b, v in pairs],
        "errors": errors,  # class -> (base's errors, variant's errors), summed over the fold seeds
        "verdict": verdict_word(*f1_ci),
    }


def points(x: float) -> str:
    """A micro-F1 difference in points of percentage, signed: +0.36."""
    return f"{100 * x:+.2f}"


def verdict_line(label: str, v: dict) -> str:
    """One line: what was compared, the differences with their intervals, McNemar, the verdict."""
    (lo, hi), (llo, lhi), m = v["delta_f1_ci"], v["delta_log_loss_ci"], v["mcnemar"]
    return (f"{label}: {v['verdict']}: micro-F1 {points(v['delta_f1'])} points [{points(lo)}, {points(hi)}], log loss "
            f"{v['delta_log_loss']:+.4f} [{llo:+.4f}, {lhi:+.4f}] ({LEVEL:.0%} paired bootstrap over {v['images']} "
            f"predictions, {v['seeds']} fold seed(s)); McNemar: {m['variant_only']} images only it gets right, "
            f"{m['base_only']} only the base, p={m['p']:.3g}")  # fmt: skip


def changed_errors(v: dict, always: tuple[str, ...] = ()) -> str:
    """The classes whose errors changed (and those in `always`), as 'Black-grass 22 -> 19'."""
    rows = [f"{c} {a} -> {b}" for c, (a, b) in v["errors"].items() if a != b or c in always]
    return ", ".join(rows) or "no class's errors changed"
