"""`make sweep`: recipes searched with Optuna. A study lives in a storage that every worker shares (a journal file in
the sweep's folder on one machine, PostgreSQL or MySQL across machines); each trial is an ordinary run under the sweep
(runs/<sweep>/trial-<n>), trained by train_fold, which reports every epoch's validation micro-F1 to the pruner.
The objective is the mean validation micro-F1 over the first `sweep_folds` folds; held-out answers never choose.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from seedlings import paths
from seedlings.config import FREE_KEYS, Recipe
from seedlings.errors import UserError
from seedlings.recipes import apply_override, parse_value, read_yaml, recipe_from_dict
from seedlings.run import open_run
from seedlings.schedule import cycle_end_epochs
from seedlings.train import train_fold

warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeat and retry are marked experimental
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial says what happened

PRUNERS = ("sha", "hyperband", "none")
HEARTBEAT_S = 60  # a running trial writes its heartbeat this often (RDB storages)
GRACE_S = 180  # ...and is failed and retried when none came for this long (a dead worker, a lost node)
MAX_RETRY = 3  # a trial whose worker died is retried this many times at most


@dataclass(frozen=True)
class Sweep:
    """A study over recipes: `base` (the recipe as a mapping) with the keys of `space` drawn per trial."""

    name: str  # runs/<name>/: the study's journal, its trials' runs, its report
    data: Path
    base: dict
    space: dict[str, BaseDistribution]
    trials: int  # the study's total, however many workers share it
    n_folds: int = 5
    fold_seed: int = 0
    sweep_folds: int = 1  # a trial's value: mean validation micro-F1 over its first sweep_folds folds
    storage: str = ""  # "" : a journal file in the sweep's folder; postgresql://..., mysql://... across machines
    pruner: str = "sha"
    min_resource: int = 4  # metrics rows (a solved head, then epochs) before the pruner may stop a trial
    reduction_factor: int = 2  # successive halving keeps the best 1/reduction_factor at each rung
    seed: int = 0  # the sampler's seed (each worker adds its own number)
    heartbeat: int = HEARTBEAT_S
    grace: int = GRACE_S

    @property
    def dir(self) -> Path:
        return paths.run_dir(self.name)

    @property
    def journal(self) -> Path:
        return self.dir / "study.journal"

    @property
    def is_file_storage(self) -> bool:
        return not self.storage or self.storage.startswith("sqlite")

    def settings(self) -> dict:
        """What the study was created with: a worker with other settings is refused instead of mixing two searches."""
        space = {k: optuna.distributions.distribution_to_json(d) for k, d in self.space.items()}
        return {"base": self.base, "space": space, "data": Path(self.data).resolve().name, "n_folds": self.n_folds,
                "fold_seed": self.fold_seed, "sweep_folds": self.sweep_folds}  # fmt: skip


# ------------------------------------------------------------------------------------------------------- the space
def load_space(path: str | Path, base: dict) -> dict[str, BaseDistribution]:
    """A search-space file: recipe key (dotted, as in ARGS) -> a list of choices | {low, high, log} | {low, high,
    step}. Every key, bound and choice is checked against the base recipe before any trial trains."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: search space not found")
    raw = read_yaml(path.read_text(encoding="utf-8", errors="replace"), str(path))
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: a search space maps recipe keys to choices or ranges")
    return {str(key): distribution(path, str(key), spec, base) for key, spec in raw.items()}


def distribution(path: Path, key: str, spec: Any, base: dict) -> BaseDistribution:
    where = f"{path}: {key}"
    if any(part.strip().split(".")[0] in FREE_KEYS for part in key.split(",")):
        raise UserError(f"{where}: changes predictions or how the pipeline runs, not the trained fold a trial is "
                        "scored on; leave it out of the space")  # fmt: skip
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where}: an empty list of choices")
        choices = [encode_choice(parse_value(v) if isinstance(v, str) else v) for v in spec]
        if len(set(choices)) != len(choices):
            raise UserError(f"{where}: a choice is listed twice")
        dist: BaseDistribution = CategoricalDistribution(choices)
        values = [decode_choice(c) for c in choices]
    elif isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "log", "step"}:
        low, high = (parse_value(str(spec[k])) for k in ("low", "high"))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise UserError(f"{where}: low and high must be numbers, got {spec['low']!r} and {spec['high']!r}")
        if low > high:
            raise UserError(f"{where}: low {low} is above high {high}")
        log, step = bool(spec.get("log", False)), spec.get("step")
        if log and (low <= 0 or step is not None):
            raise UserError(f"{where}: log ranges need low > 0 and no step")
        if isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)):
            dist = IntDistribution(low, high, log=log, step=step or 1)
        else:
            dist = FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))
        values = [low, high]
    else:
        raise UserError(f"{where}: expected a list of choices, {{low, high, log}} or {{low, high, step}}, got {spec!r}")
    for value in values:  # each bound and choice must make a valid recipe with the base (ranges, known keys)
        try:
            recipe_with(base, {key: value})
        except UserError as e:
            raise UserError(f"{where}: {value!r} does not make a valid recipe ({e})") from None
    return dist


def encode_choice(value: Any) -> Any:
    """Optuna stores choices as plain scalars: a list or mapping (a stage list, an LR {max, mult}) as its YAML text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "yaml:" + yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()


def decode_choice(value: Any) -> Any:
    return parse_value(value[5:]) if isinstance(value, str) and value.startswith("yaml:") else value


def recipe_with(base: dict, params: dict[str, Any]) -> Recipe:
    """The base recipe with a trial's values; an impossible combination exits 2 naming the key (the trial fails)."""
    values = json.loads(json.dumps(base))  # a deep copy
    for key, value in params.items():
        for part in key.split(","):  # keys joined by commas take one value together (a size for every stage)
            apply_override(values, part.strip(), decode_choice(value))
    return recipe_from_dict(values)


def fold_rows(recipe: Recipe) -> tuple[int, int]:
    """(metrics rows, SGDR epochs) a fold of this recipe writes: a solved head is one row and no epoch."""
    epochs = [cycle_end_epochs(s.n_cycles, s.cycle_len, s.cycle_mult)[-1] for s in recipe.stages if s.fit == "sgdr"]
    return len(recipe.stages) - len(epochs) + sum(epochs), sum(epochs)


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
        elif recorded != sweep.settings():
            diff = [k for k in recorded if recorded[k] != sweep.settings().get(k)]
            raise UserError(f"study {sweep.name!r}: created with another {', '.join(diff)}; use the same CONFIG, ARGS, "
                            "SPACE and data, or another SWEEP")  # fmt: skip
    return study


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
    per_fold, epochs_per_fold = fold_rows(recipe)
    trial.set_user_attr("planned_epochs", epochs_per_fold * sweep.sweep_folds)
    trial.set_user_attr("run", run.name)
    epochs, scores = 0, []
    for i in range(sweep.sweep_folds):

        def on_epoch(row: dict, offset: int = i * per_fold) -> None:
            nonlocal epochs
            epochs += 1
            trial.set_user_attr("epochs", epochs)
            step = offset + int(row["epoch"])
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
    print(f"trial {trial.number}: val micro-F1 {value:.4f} ({', '.join(f'{k}={v}' for k, v in params.items())})")
    return value


def suggest(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
