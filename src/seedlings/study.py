"""A sweep's Optuna study: its storage (a journal file on one machine, PostgreSQL or MySQL across machines), the lock
under which workers create it and start trials, the sampler and pruner, and the worker that runs trials through
train_fold until the study holds its total."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import optuna_dashboard
import sqlalchemy
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from seedlings.chain import blend_members
from seedlings.config import Recipe, recipe_dict
from seedlings.errors import UserError
from seedlings.folds import load_folds
from seedlings.predict import predict_run
from seedlings.run import Run, open_run
from seedlings.sweep import MAX_RETRY, SETTINGS_BEFORE, Sweep, fold_epochs, recipe_with
from seedlings.train import train_fold


# ----------------------------------------------------------------------------------------------- storage and study
def check_storage(sweep: Sweep) -> None:
    """A file storage (journal, SQLite) holds one machine's workers: Optuna documents both as unsafe on network file
    systems, so a second host is refused."""
    if not sweep.is_file_storage:
        return
    hosts = sweep.dir / "hosts.json"
    host = socket.gethostname()
    known = json.loads(hosts.read_text()) if hosts.exists() else [host]
    if host not in known:
        raise UserError(f"{sweep.journal if not sweep.storage else sweep.storage}: a file storage is safe for the "
                        f"workers of one machine ({known[0]}), not {host} too (Optuna documents journal and SQLite "
                        "files as unsafe on network file systems); use STORAGE=postgresql://...")  # fmt: skip
    sweep.dir.mkdir(parents=True, exist_ok=True)
    hosts.write_text(json.dumps(known))


def storage_of(sweep: Sweep):
    """The Optuna storage: built under the sweep's lock (N workers that start at once would race on creating an RDB's
    tables); an unreachable server exits 2 naming the host, never the password."""
    if not sweep.storage:
        sweep.dir.mkdir(parents=True, exist_ok=True)
        path = str(sweep.journal)
        return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    heartbeat = {} if sweep.storage.startswith("sqlite") else {
        "heartbeat_interval": sweep.heartbeat, "grace_period": sweep.grace,
        "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
    }  # fmt: skip
    try:
        return optuna.storages.RDBStorage(sweep.storage, engine_kwargs={"pool_pre_ping": True}, **heartbeat)
    except Exception as e:  # noqa: BLE001 - a wrong URL or a down server is the user's input
        raise UserError(f"STORAGE: cannot open the study's database at {safe_url(sweep.storage)} "
                        f"({type(e).__name__}: {first_line(e)})") from None  # fmt: skip


def safe_url(url: str) -> str:
    """The storage URL with its password masked."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.split("@")[-1]


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


class SweepLock:
    """One worker at a time counts the trials and starts the next one (so the study ends at exactly `trials`), and
    creates the study: an advisory lock of the database server across machines, a file lock on one."""

    def __init__(self, sweep: Sweep):
        self.sweep, self.conn, self.file, self.held = sweep, None, None, False

    def acquire(self) -> None:
        url = self.sweep.storage
        if url.startswith(("postgresql", "mysql")):
            key = int(hashlib.sha256(self.sweep.name.encode()).hexdigest()[:15], 16)  # a bigint from the name
            try:
                self.conn = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool).connect()
                lock = "SELECT pg_advisory_lock(:k)" if url.startswith("postgresql") else "SELECT GET_LOCK(:k, -1)"
                self.conn.execute(sqlalchemy.text(lock), {"k": key if url.startswith("postgresql") else str(key)})
            except Exception as e:  # noqa: BLE001
                raise UserError(f"STORAGE: cannot reach the study's database at {safe_url(url)} "
                                f"({type(e).__name__}: {first_line(e)})") from None  # fmt: skip
        else:
            self.sweep.dir.mkdir(parents=True, exist_ok=True)
            self.file = open(self.sweep.dir / ".sweep.lock", "a+")  # noqa: SIM115 - held across calls
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.conn is not None:
            self.conn.close()  # ends the session: the advisory lock goes with it
            self.conn = None
        if self.file is not None:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None

    @contextmanager
    def held_for(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


def open_study(sweep: Sweep, lock: SweepLock | None = None) -> optuna.Study:
    """The sweep's study, created on first use with its settings recorded; later workers must bring the same ones."""
    check_storage(sweep)
    lock = lock or SweepLock(sweep)
    with lock.held_for():
        storage = storage_of(sweep)
        study = optuna.create_study(study_name=sweep.name, storage=storage, direction="maximize",
                                    sampler=sampler(sweep), pruner=pruner(sweep), load_if_exists=True)  # fmt: skip
        recorded = study.user_attrs.get("settings")
        if recorded is None:
            study.set_user_attr("settings", sweep.settings())
            study.set_user_attr("trials", sweep.trials)
            study.set_user_attr("pruner", sweep.pruner)
            study.set_user_attr("data_path", str(Path(sweep.data).resolve()))
        else:
            diff = settings_diff(recorded, sweep.settings())
            if diff:
                raise UserError(f"study {sweep.name!r}: created with another {', '.join(diff)}; use the same CONFIG, "
                                "ARGS, SPACE and data, or another SWEEP")  # fmt: skip
    return study


def settings_diff(recorded: dict, now: dict) -> list[str]:
    """What differs between a study's recorded settings and a worker's, the base recipe key by key. A recipe key the
    project gained after the study was created counts as its default in the recorded base, so an update that adds a
    key (off by default) does not orphan a study; so does a setting (a study from before objectives: `fold`)."""
    defaults = recipe_dict(Recipe())
    recorded, now = {**SETTINGS_BEFORE, **recorded}, {**SETTINGS_BEFORE, **now}
    old_base = {k: recorded["base"].get(k, defaults[k]) for k in now["base"]}
    keys = [f"base key {k}" for k in now["base"] if old_base[k] != now["base"][k]]
    keys += [f"base key {k}" for k in recorded["base"] if k not in now["base"]]
    return keys + [k for k in recorded if k != "base" and recorded[k] != now.get(k)]


def sampler(sweep: Sweep) -> optuna.samplers.BaseSampler:
    """TPE, its first trials random; each worker draws from its own seed, so parallel workers do not repeat each
    other's first trials."""
    startup = max(4, min(10, sweep.trials // 3))
    return optuna.samplers.TPESampler(n_startup_trials=startup, seed=sweep.seed + os.getpid() % 10_000)


def pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    if sweep.pruner == "none":
        return optuna.pruners.NopPruner()
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=sweep.min_resource, reduction_factor=sweep.reduction_factor)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=sweep.min_resource,
                                                  reduction_factor=sweep.reduction_factor)  # fmt: skip


def slots_taken(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that count towards the total: every trial but a dead worker's, whose retry stands in for it."""
    retried = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    return sum(1 for t in trials if t.number not in retried)


# -------------------------------------------------------------------------------------------------------- a worker
def run_worker(sweep: Sweep) -> int:
    """Run trials until the study holds `trials` of them; returns how many this worker ran."""
    lock = SweepLock(sweep)
    study = open_study(sweep, lock)
    ran = 0
    while True:
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(study)  # dead workers' trials failed and queued again (heartbeat)
            if sweep.is_file_storage:
                fail_dead_local_trials(study)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and slots_taken(trials) >= sweep.trials:
                break
            # the lock is released by the objective once its trial exists: counting and asking are one step
            study.optimize(lambda trial: objective(sweep, trial, lock), n_trials=1,
                           catch=(UserError, MemoryError))  # fmt: skip
            ran += 1
        finally:
            lock.release()
    return ran


def process_alive(pid: int) -> bool:
    """Whether pid is a live seedlings process on this machine (a pid reused by another program counts as dead)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): the pid alone
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return b"seedlings" in cmdline


def fail_dead_local_trials(study: optuna.Study) -> None:
    """A file storage has no heartbeat (Optuna's journal and SQLite backends keep none), but all its workers are on
    this machine: a running trial whose worker process is gone (kill -9, a reboot, the OOM killer) is failed and
    queued again with the same parameters, like the heartbeat's retry, so it resumes from its checkpoint."""
    host = socket.gethostname()
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if pid is None or t.user_attrs.get("host") != host or process_alive(int(pid)):
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # what fail_stale_trials does
        print(f"trial {t.number}: its worker (process {pid}) is gone; failed and queued again")
        retry(study, study._storage.get_trial(t._trial_id))


def objective(sweep: Sweep, trial: optuna.Trial, lock: SweepLock) -> float:
    lock.release()
    params = {key: suggest(trial, key, dist) for key, dist in sweep.space.items()}
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    original = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    number = trial.number if original is None else original  # a retry trains on in its original's folder
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    try:
        recipe = recipe_with(sweep.base, params)
        run = open_run(f"{sweep.name}/trial-{number:04d}", sweep.data, recipe, sweep.n_folds, sweep.fold_seed)
    except UserError as e:
        trial.set_user_attr("error", str(e))
        print(f"trial {trial.number}: refused: {e}")
        raise
    trial.set_user_attr("planned_epochs", fold_epochs(recipe) * sweep.sweep_folds)
    trial.set_user_attr("run", run.name)
    epochs, scores = 0, []
    for i in range(sweep.sweep_folds):

        def on_epoch(row: dict, fold: int = i) -> None:
            # the pruner sees fold 0's epochs only: every trial's step k is then the same epoch of the same fold
            # whatever its length (numbered on through the next folds, a 12-epoch trial's fold 1 would meet a
            # 16-epoch trial's fold 0 at one rung); a trial that survives fold 0 runs its other folds to the end
            nonlocal epochs
            epochs += 1
            trial.set_user_attr("epochs", epochs)
            if fold > 0:
                return
            step = int(row["epoch"])
            trial.report(float(row["val_f1"]), step)
            if trial.should_prune():
                print(f"trial {trial.number}: pruned at epoch {step} (val micro-F1 {row['val_f1']:.4f})")
                raise optuna.TrialPruned(f"epoch {step}: val micro-F1 {row['val_f1']:.4f}")

        try:
            final = train_fold(run, i, on_epoch=on_epoch)
        except UserError as e:
            trial.set_user_attr("error", str(e))
            raise
        scores.append(final["val_f1"])
    trial.set_user_attr("epochs", epochs)
    value = float(np.mean(scores))
    trial.set_user_attr("fold_value", value)
    what = f"val micro-F1 {value:.4f}"
    if sweep.objective == "chain":
        value, log_loss, calibrated = chain_value(run, sweep.sweep_folds)
        trial.set_user_attr("log_loss", log_loss)
        trial.set_user_attr("calibrated", calibrated)
        what = f"chain OOF micro-F1 {value:.4f}, log loss {log_loss:.4f} (the folds' last epochs: {what})"
    print(f"trial {trial.number}: {what} ({', '.join(f'{k}={v}' for k, v in params.items())})")
    return value


def chain_value(run: Run, n_folds: int) -> tuple[float, float, bool]:
    """The trial's first n_folds folds predicted (TTA, every snapshot; skipped when already done) and blended as `make
    submit` blends them: (OOF micro-F1, OOF log loss, whether calibration was used). The trial's run is then a
    finished chain of those folds: `make submit RUN=<sweep>/trial-<n>` blends it without training."""
    members = predict_run(run, list(range(n_folds)))
    folds = load_folds(run.data, run.n_folds, run.fold_seed)
    *_, table, calibration = blend_members(run.recipe, members, folds, run.comp.classes)
    row = table["blend"]
    return float(row["micro_f1"]), float(row["log_loss"]), bool(calibration and calibration["used"])


def suggest(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def serve_dashboard(name: str, storage: str, port: int) -> int:
    """optuna-dashboard on the sweep's storage, on 127.0.0.1 only (it has no authentication)."""
    sweep = Sweep(name, Path("."), {}, {}, 0, storage=storage)
    if not storage and not sweep.journal.exists():
        raise UserError(f"{sweep.journal}: no study of sweep {name!r} here (make sweep first, or give STORAGE)")
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    print(f"optuna-dashboard for sweep {name!r}: http://127.0.0.1:{port}/ (Ctrl-C to stop)", flush=True)
    optuna_dashboard.run_server(storage_of(sweep), host="127.0.0.1", port=port)
    return 0
