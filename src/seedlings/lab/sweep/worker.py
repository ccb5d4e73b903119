"""A sweep's worker: trials run through train_fold until the study holds its total, each scored by its objective
(the folds' last epochs, or the chain's blend of them); a dead worker's trial is queued again and resumes."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import threading
from time import sleep
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from seedlings.chain.submit import evaluate_chain
from seedlings.errors import UserError
from seedlings.lab.sweep.heartbeat import end_at_last_heartbeat, heartbeat_ages, silent_trials
from seedlings.lab.sweep.settings import DIGITS, shown
from seedlings.lab.sweep.space import MAX_RETRY, Sweep, TrialRefused, fold_epochs, recipe_with
from seedlings.lab.sweep.study import SweepLock, lost_storage, open_study
from seedlings.run import Run, open_run
from seedlings.storage import process_alive
from seedlings.track.mlflow import track_trial
from seedlings.train.fit import train_fold

HEARTBEAT_LOST = threading.Event()  # set when Optuna's heartbeat thread could not reach the database


class WorkerStopped(UserError):
    """Not the trial's parameters: the worker stops (exit 2) and the trial is queued again."""


def slots_taken(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that count towards the total: one per original trial, however often a dead worker's trial was retried
    (Optuna records the first original as `failed_trial` of every retry, a retry of a retry included)."""
    return len({t.system_attrs.get("failed_trial", t.number) for t in trials})


def run_worker(sweep: Sweep) -> int:
    """Run trials until the study holds `trials` of them; returns how many this worker ran."""
    lock = SweepLock(sweep)
    study = open_study(sweep, lock)
    threading.excepthook = heartbeat_hook
    ran = 0
    while True:
        full = False
        lock.acquire()
        try:
            ages = heartbeat_ages(sweep)
            optuna.storages.fail_stale_trials(study)  # dead workers' trials failed and queued again (heartbeat)
            end_at_last_heartbeat(study, sweep, ages)
            if sweep.is_file_storage:
                fail_dead_local_trials(study)
            trials = study.get_trials(deepcopy=False)
            full = not any(t.state == TrialState.WAITING for t in trials) and slots_taken(trials) >= sweep.trials
            if not full:
                run_one(sweep, study, lock)
                ran += 1
        finally:
            lock.release()
        if full:  # nothing to start: done, unless a running trial's worker is gone (then it is retried here)
            silent = silent_trials(sweep)
            if not silent:
                break
            pause = max(silent.values()) + 1
            print(f"trial(s) {', '.join(map(str, sorted(silent)))}: no heartbeat from their worker; retried here once "
                  f"the grace period is over, in {pause:.0f} s", flush=True)  # fmt: skip
            sleep(pause)
    return ran


def run_one(sweep: Sweep, study: optuna.Study, lock: SweepLock) -> None:
    """One trial. What stops it for a reason that is not its parameters (Ctrl-C, an error every trial would meet)
    leaves it queued again; a database gone mid-trial ends the worker in one line."""
    started: list[int] = []  # the trial this worker starts (its id)
    try:
        # the lock is released by the objective once its trial exists: counting and asking are one step
        study.optimize(lambda trial: labelled(sweep, trial, lock, started), n_trials=1,
                       catch=(TrialRefused, MemoryError))  # fmt: skip
    except (KeyboardInterrupt, UserError) as e:
        if started:
            try:
                queue_again(study, started[0], "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped")
            except Exception:  # the database is gone too: after its grace, the heartbeat's retry queues the trial
                stop_if_lost(sweep)
                raise
        raise
    except Exception:
        stop_if_lost(sweep)
        raise


def stop_if_lost(sweep: Sweep) -> None:
    lost = lost_storage(sweep)
    if lost is not None:
        raise lost from None


def heartbeat_hook(args: threading.ExceptHookArgs) -> None:
    """Optuna's heartbeat thread ends with a traceback when the database goes away. Instead it raises a flag, and the
    trial's next epoch stops the worker in one line: a trial without a heartbeat would be retried by another worker
    while this one still trains it."""
    if isinstance(args.exc_value, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError)):
        HEARTBEAT_LOST.set()
        return
    threading.__excepthook__(args)


def queue_again(study: optuna.Study, trial_id: int, why: str, max_retry: int | None = None) -> None:
    """A trial stopped for a reason that is not its parameters (Ctrl-C, an error every trial would meet, a dead local
    worker) is failed and queued again with the same parameters, as the heartbeat's retry does: the next worker resumes
    it from its checkpoint in the same folder, and it keeps its one place in TRIALS. max_retry: None for a stop of
    this worker's own, however often it happens; MAX_RETRY for a dead worker, as the heartbeat allows."""
    storage = study._storage
    if storage.get_trial(trial_id).state == TrialState.RUNNING:  # what fail_stale_trials does first
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    frozen = storage.get_trial(trial_id)
    RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, frozen)
    print(f"trial {frozen.number}: {why}; queued again with its parameters (the next worker resumes it)", flush=True)


def fail_dead_local_trials(study: optuna.Study) -> None:
    """A file storage has no heartbeat (Optuna's journal and SQLite backends keep none), but all its workers are on
    this machine: a running trial whose worker process is gone (kill -9, a reboot, the OOM killer) is failed and
    queued again with the same parameters, like the heartbeat's retry, so it resumes from its checkpoint."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if pid is None or t.user_attrs.get("host") != host or process_alive(int(pid), running=b"seedlings"):
            continue
        queue_again(study, t._trial_id, f"its worker (process {pid}) is gone", MAX_RETRY)


class TrialLines(io.TextIOBase):
    """Standard output during a trial, each line headed by the trial's number: two workers' epoch lines interleave
    in one terminal or log."""

    def __init__(self, out, label: str):
        self.out, self.label, self.fresh = out, label, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            self.out.write(self.label + piece if self.fresh else piece)
            self.fresh = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def labelled(sweep: Sweep, trial: optuna.Trial, lock: SweepLock, started: list[int]) -> float:
    with contextlib.redirect_stdout(TrialLines(sys.stdout, f"[trial {trial.number}] ")):
        return objective(sweep, trial, lock, started)


def objective(sweep: Sweep, trial: optuna.Trial, lock: SweepLock, started: list[int]) -> float:
    started.append(trial._trial_id)
    lock.release()
    params = {key: suggest(trial, key, dist) for key, dist in sweep.space.items()}
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    original = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    number = trial.number if original is None else original  # a retry trains on in its original's folder
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    try:
        recipe = recipe_with(sweep.base, params)
    except UserError as e:  # this combination of the space's values: the trial fails, the sweep goes on
        trial.set_user_attr("error", str(e))
        print(f"trial {trial.number}: refused: {e}")
        raise TrialRefused(str(e)) from None
    # the trial's folder or the data refused: the same for every trial, so the worker stops (exit 2)
    run = open_run(f"{sweep.name}/trial-{number:04d}", sweep.data, recipe, sweep.n_folds, sweep.fold_seed)
    trial.set_user_attr("planned_epochs", fold_epochs(recipe) * sweep.sweep_folds)
    trial.set_user_attr("run", run.name)
    epochs, scores = 0, []
    for i in range(sweep.sweep_folds):

        def on_epoch(row: dict, fold: int = i) -> None:
            # the pruner sees fold 0's epochs only: every trial's step k is then the same epoch of the same fold
            # whatever its length (numbered on through the next folds, a 12-epoch trial's fold 1 would meet a
            # 16-epoch trial's fold 0 at one rung); a trial that survives fold 0 runs its other folds to the end
            nonlocal epochs
            if HEARTBEAT_LOST.is_set():
                raise WorkerStopped(f"STORAGE: trial {trial.number}'s heartbeat stopped (the database went away); this "
                                "worker stopped so that no other trains the trial at the same time")  # fmt: skip
            epochs += 1
            trial.set_user_attr("epochs", epochs)
            if fold > 0:
                return
            step = int(row["epoch"])
            trial.report(round(float(row["val_f1"]), DIGITS), step)
            if trial.should_prune():
                print(f"trial {trial.number}: pruned at epoch {step} (val micro-F1 {row['val_f1']:.4f})")
                raise optuna.TrialPruned(f"epoch {step}: val micro-F1 {row['val_f1']:.4f}")

        try:
            final = train_fold(run, i, on_epoch=on_epoch, chain=range(sweep.sweep_folds))
        except optuna.TrialPruned:
            track_trial(run, "PRUNED", pruned_epoch=epochs)
            raise
        except WorkerStopped:
            raise
        except UserError as e:  # what training refuses of this recipe: the trial fails, the sweep goes on
            trial.set_user_attr("error", str(e))
            print(f"trial {trial.number}: refused: {e}")
            track_trial(run, "FAIL")
            raise TrialRefused(str(e)) from None
        scores.append(final["val_f1"])
    trial.set_user_attr("epochs", epochs)
    value = round(float(np.mean(scores)), DIGITS)
    trial.set_user_attr("fold_value", value)
    what = f"val micro-F1 {value:.4f}"
    if sweep.objective == "chain":
        value, log_loss, calibrated = chain_value(run, sweep.sweep_folds)
        trial.set_user_attr("log_loss", log_loss)
        trial.set_user_attr("calibrated", calibrated)
        what = f"chain OOF micro-F1 {value:.4f}, log loss {log_loss:.4f} (the folds' last epochs: {what})"
    print(f"trial {trial.number}: {what} ({', '.join(f'{k}={shown(v)}' for k, v in params.items())})")
    track_trial(run, "COMPLETE", value)
    return value


def chain_value(run: Run, n_folds: int) -> tuple[float, float, bool]:
    """The trial's first n_folds folds predicted (TTA, every snapshot; skipped when already done) and blended as `make
    submit` blends them: (OOF micro-F1, OOF log loss, whether calibration was used). The trial's run is then a
    finished chain of those folds: `make submit RUN=<sweep>/trial-<n>` blends it without training."""
    chain = evaluate_chain(run, folds=list(range(n_folds)))
    score = chain.score
    return round(float(score["micro_f1"]), DIGITS), round(float(score["log_loss"]), DIGITS), chain.calibrated


def suggest(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
