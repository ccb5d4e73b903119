"""`make mle`: MLE-bench's protocol on a labelled competition, so that the chain's score stands beside MLE-bench's
published agents and Kaggle's leaderboard lines. MLE-bench makes its test set with a plain
train_test_split(test_size=0.14, random_state=0) of the labelled photos in species-then-name order, not stratified;
here the same split of the given folder (of all 4,750 photos on the real competition; of a share of them elsewhere,
which is then a smaller split by the same protocol, not MLE-bench's), the whole chain trained on the rest and graded
once."""

from __future__ import annotations

import numpy as np
import pandas as pd

from seedlings.lab.holdout import answers_of, chain_row, ensure_holdout
from seedlings.metrics import pair_confusion
from seedlings.run import Run, open_run
from seedlings.storage import write_json

MLE_FRACTION = 0.14  # MLE-bench: 794 / (4,750 + 794), the real test set's share, of the labelled photos held out
MLE_SEED = 0
KAGGLE_LINES = {"median": 0.956, "bronze": 0.982, "silver": 0.986, "gold": 0.992}  # the leaderboard's micro-F1
GRASSES = ("Black-grass", "Loose Silky-bent")  # the pair most of the recipe's errors fall in


def mle(run: Run) -> dict:
    """The split (data/<data>-split-f14-s0), the chain on it (runs/<run>-mle), its grade, Kaggle's lines it reaches,
    and how the two grasses were confused; written to runs/<run>-mle/mle.json and printed."""
    split = ensure_holdout(run.data, MLE_FRACTION, MLE_SEED, stratified=False)
    held = open_run(f"{run.name}-mle", split, run.recipe, run.n_folds, run.fold_seed)
    row = chain_row(held, "recipe")
    classes = held.comp.classes
    sub = pd.read_csv(held.submission_path)
    labels = answers_of(split, sub.file.tolist(), classes)
    pred = np.array([classes.index(s) for s in sub.species])
    result = {
        "data": str(run.data), "split": str(split), "train_images": len(held.comp.train_files),
        "test_images": len(sub), "micro_f1": row["micro_f1"], "macro_f1": row["macro_f1"], "seconds": row["seconds"],
        "lines": {line: row["micro_f1"] >= score for line, score in KAGGLE_LINES.items()},
        "grasses": pair_confusion(labels, pred, classes, GRASSES) if set(GRASSES) <= set(classes) else None,
    }  # fmt: skip
    write_json(held.dir / "mle.json", result)
    print("\n".join(mle_lines(result)))
    return result


def mle_lines(result: dict) -> list[str]:
    lines = [f"MLE-bench's split of {result['data']} (train_test_split(test_size=0.14, random_state=0), not "
             f"stratified): {result['train_images']} training photos, {result['test_images']} graded",
             f"whole chain (make submit): micro-F1 {result['micro_f1']:.4f}, macro-F1 {result['macro_f1']:.4f}, "
             f"{result['seconds']:.0f} s",
             "Kaggle's leaderboard: " + ", ".join(f"{line} {score:.3f} {'reached' if result['lines'][line] else 'not'}"
                                                 for line, score in KAGGLE_LINES.items())]  # fmt: skip
    grasses = result["grasses"]
    if grasses:
        (aa, ab), (ba, bb) = grasses["counts"]
        a, b = grasses["pair"]
        lines += [f"{a} vs {b}: {grasses['pair_errors']} of the {grasses['errors']} errors are the one taken for the "
                  f"other ({a} as {b}: {ab}, {b} as {a}: {ba}; right: {aa} and {bb})"]  # fmt: skip
    return lines
