"""The defaults every command shares, said once: the competition, where its folder goes, the recipe, the fold split,
the folds trained at once. Nothing of the pipeline is imported here, so the command line reads them (and shows them in
its help) without loading it."""

import os

COMPETITION = "plant-seedlings-classification"  # Kaggle's name for it (fetch, upload, leaderboard)
DATA = f"data/{COMPETITION}"  # the competition folder, relative to where commands run (the repo)
CONFIG = "configs/cpu.yaml"  # the recipe
KAGGLE_RECIPE = "configs/gpu.yaml"  # the recipe a Kaggle notebook runs (make kaggle, make kaggle-output)
N_FOLDS = 5  # folds of the split: runs with the same (data, n_folds, fold_seed) share folds and blend
FOLD_SEED = 0  # seed of the fold split, apart from the recipe's training seed
SEEDS = "0 1"  # make try: the fold seeds a verdict is taken over
TRIALS = 20  # make sweep: trials in the study in all
PRUNER = "sha"  # make sweep: successive halving
SWEEP_FOLDS = 1  # make sweep: folds a trial's value comes from
OBJECTIVE = "fold"  # make sweep: a trial's value is its folds' mean last-epoch validation micro-F1


def parallel_jobs() -> int:
    """Folds trained at once on this machine (`make -j N train` sets SEEDLINGS_JOBS): each takes 1/N of the cores."""
    try:
        return max(1, int(os.environ.get("SEEDLINGS_JOBS", "1") or 1))
    except ValueError:
        return 1
