"""What a sweep is set with, said once and light enough for the command line's help: the pruners (each built when a
study is opened, Optuna imported then), the objectives a trial is scored by, and the heartbeat of RDB storages."""

from __future__ import annotations

HEARTBEAT_S = 60  # a running trial writes its heartbeat this often (RDB storages)
GRACE_S = 180  # ...and is failed and retried when none came for this long (a dead worker, a lost node)


def successive_halving(min_resource: int, reduction_factor: int):
    """successive halving (the default)"""
    from optuna.pruners import SuccessiveHalvingPruner

    return SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor)


def hyperband(min_resource: int, reduction_factor: int):
    """Hyperband (successive halving at several budgets)"""
    from optuna.pruners import HyperbandPruner

    return HyperbandPruner(min_resource=min_resource, reduction_factor=reduction_factor)


def no_pruning(min_resource: int, reduction_factor: int):
    """every trial runs to the end"""
    from optuna.pruners import NopPruner

    return NopPruner()


PRUNERS = {"sha": successive_halving, "hyperband": hyperband, "none": no_pruning}
METRICS = {"fold": "val micro-F1", "chain": "chain OOF micro-F1"}  # a trial's value, as the dashboard names it
OBJECTIVES = {  # a trial's value, over its first `sweep_folds` folds
    "fold": "the mean of the folds' last-epoch validation micro-F1 (one view each, no blend)",
    "chain": "the out-of-fold micro-F1 of the folds' blend, as make submit blends them (TTA, snapshots, calibration)",
}
DIGITS = 4  # a trial's value and its scores as stored in the study: micro-F1 on fewer than 10,000 images loses nothing


def shown(value) -> str:
    """A number as the report and the log show it: 4 significant digits; a rate under 0.01 in scientific notation with
    3 (0.00214 -> 2.14e-03); anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and value != 0 and abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.4g}"
