"""A sweep's Optuna study: its storage (a journal file on one machine, PostgreSQL or MySQL across machines), the lock
under which workers create it and start trials, the sampler and pruner, and the dashboard on it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import optuna_dashboard
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from seedlings.errors import UserError
from seedlings.lab.sweep.settings import METRICS, PRUNERS
from seedlings.lab.sweep.space import MAX_RETRY, SETTINGS_BEFORE, Sweep
from seedlings.recipe.schema import Recipe, recipe_dict
from seedlings.storage import loopback_port

SETTINGS = "seedlings:settings"  # the study's system attribute holding what it was created with (Sweep.settings)


# ----------------------------------------------------------------------------------------------- storage and study
def check_storage(sweep: Sweep) -> None:
    """A file storage (journal, SQLite) holds one machine's workers: Optuna documents both as unsafe on network file
    systems, so a second host is refused. A URL of another kind is refused before anything is written."""
    if sweep.storage and not sweep.storage.startswith(("sqlite:///", "postgresql", "mysql")):
        raise UserError(f"--storage: expected postgresql://..., mysql://... or sqlite:///..., got "
                        f"{safe_url(sweep.storage)!r}")  # fmt: skip
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
        check_journal(sweep.journal)
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


def check_journal(path: Path) -> None:
    """A journal file as Optuna writes it: one JSON record a line. A last line cut mid-write (a full disk, a machine
    that went down) is removed, the file as it was kept beside it: the next record would land on the partial one and
    from then on Optuna could read nothing. Any other damage exits 2 naming the line. Read under Optuna's own lock, so
    a record another worker is appending is never taken for a cut one."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # the bytes after the last newline: none unless a write was cut
        for number, line in enumerate(lines, 1):
            if not journal_record(line):
                raise UserError(f"{path}: line {number} is not an Optuna journal record (the file is damaged); repair "
                                "or remove that line, or start another SWEEP")  # fmt: skip
        if tail and not tail.startswith(b'{"op_code":'):
            raise UserError(f"{path}: line {len(lines) + 1} is not an Optuna journal record (the file is damaged); "
                            "remove it, or start another SWEEP")  # fmt: skip
        if tail:
            kept = path.with_name(path.name + ".damaged")
            shutil.copyfile(path, kept)
            os.truncate(path, len(data) - len(tail))
            print(f"{path}: its last line was cut mid-write ({len(tail)} bytes); removed it, the file as it was "
                  f"kept as {kept}", file=sys.stderr)  # fmt: skip
    finally:
        lock.release()


def journal_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return False
    return isinstance(record, dict) and "op_code" in record


def check_trial_folders(sweep: Sweep) -> None:
    """A journal deleted or emptied while its trials' folders remain: a new study would start over in those folders
    (each trial refused by the run it meets), so it is refused instead of silently replacing the old one."""
    if sweep.storage or (sweep.journal.is_file() and sweep.journal.stat().st_size > 0):
        return
    folders = sorted(sweep.dir.glob("trial-*"))
    if folders:
        state = "empty" if sweep.journal.exists() else "missing"
        raise UserError(f"{sweep.journal}: {state}, but {sweep.dir} holds {len(folders)} trial folder(s) of a study; "
                        "restore the journal, remove those folders, or start another SWEEP")  # fmt: skip


def lost_storage(sweep: Sweep) -> UserError | None:
    """The database server gone mid-trial: one line naming it. The trial stays RUNNING; once the server is back, a
    worker started after the heartbeat's grace period fails it and retries it from its checkpoint."""
    if sweep.is_file_storage:
        return None
    try:
        sweep.database().connect().close()
    except Exception as e:  # noqa: BLE001 - unreachable: that is what went wrong
        return UserError(f"STORAGE: lost the study's database at {safe_url(sweep.storage)} mid-trial "
                         f"({type(e).__name__}: {first_line(e)}); once it is back, `make sweep` resumes the trial "
                         f"after the heartbeat's grace ({sweep.grace} s)")  # fmt: skip
    return None


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
                self.conn = self.sweep.database().connect()
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
        check_trial_folders(sweep)
        storage = storage_of(sweep)
        study = optuna.create_study(study_name=sweep.name, storage=storage, direction="maximize",
                                    sampler=sampler(sweep), pruner=pruner(sweep), load_if_exists=True)  # fmt: skip
        recorded = recorded_settings(storage, study)
        if recorded is None:
            storage.set_study_system_attr(storage.get_study_id_from_name(sweep.name), SETTINGS, sweep.settings())
            optuna_dashboard.save_note(study, sweep.note())  # the settings as the dashboard shows them
            study.set_user_attr("trials", sweep.trials)
            study.set_user_attr("pruner", sweep.pruner)
            study.set_user_attr("data_path", str(Path(sweep.data).resolve()))
            study.set_metric_names([METRICS[sweep.objective]])  # the dashboard's axis, not "Objective 0"
            study.set_user_attr("holdout", sweep.holdout)
        else:
            diff = settings_diff(recorded, sweep.settings())
            if diff:
                raise UserError(f"study {sweep.name!r}: created with another {', '.join(diff)}; use the same CONFIG, "
                                "ARGS, SPACE and data, or another SWEEP")  # fmt: skip
            check_trials(study, sweep)
    return study


def recorded_settings(storage, study: optuna.Study) -> dict | None:
    """The settings the study was created with (None: not made by `make sweep`): a system attribute, kept out of the
    dashboard's attribute table, which cut the JSON; studies created before that kept them as a user attribute."""
    recorded = storage.get_study_system_attrs(storage.get_study_id_from_name(study.study_name)).get(SETTINGS)
    return recorded if recorded is not None else study.user_attrs.get("settings")


def check_trials(study: optuna.Study, sweep: Sweep) -> None:
    """TRIALS is the study's total: another number is refused (it used to run on silently to the new one), unless
    --add-trials raises it."""
    held = int(study.user_attrs.get("trials", sweep.trials))
    if held == sweep.trials:
        return
    if sweep.add_trials and sweep.trials > held:
        study.set_user_attr("trials", sweep.trials)
        print(f"study {sweep.name!r}: its total raised from {held} to {sweep.trials} trials")
        return
    more = " (--add-trials only raises it)" if sweep.add_trials else f", or ADD_TRIALS=1 to raise it to {sweep.trials}"
    raise UserError(
        f"--trials: study {sweep.name!r} holds {held} trials, given {sweep.trials}; give TRIALS={held}{more}"
    )


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
    return PRUNERS[sweep.pruner](sweep.min_resource, sweep.reduction_factor)


def load_sweep(name: str, storage: str = "") -> tuple[Sweep, optuna.Study]:
    """A sweep as its study recorded it (base recipe, space, data, split, objective, pruner, trials) and the study: what
    the report needs, with nothing typed again."""
    shell = Sweep(name, Path("."), {}, {}, 0, storage=storage)
    if not storage and not shell.journal.exists():
        raise UserError(f"{shell.journal}: no study of sweep {name!r} here (make sweep first, or give STORAGE)")
    store = storage_of(shell)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        raise UserError(f"{safe_url(storage) if storage else shell.journal}: no study named {name!r}") from None
    attrs = study.user_attrs
    recorded = recorded_settings(store, study)
    if recorded is None:
        raise UserError(f"study {name!r}: not made by `make sweep` (it records no settings)")
    recorded = {**SETTINGS_BEFORE, **recorded}
    space = {k: optuna.distributions.json_to_distribution(v) for k, v in recorded["space"].items()}
    data = Path(attrs.get("data_path") or recorded["data"])
    sweep = Sweep(name, data, recorded["base"], space, int(attrs.get("trials", 0)), recorded["n_folds"],
                  recorded["fold_seed"], recorded["sweep_folds"], storage, attrs.get("pruner", "sha"),
                  objective=recorded["objective"], holdout=bool(attrs.get("holdout", True)))  # fmt: skip
    return sweep, study


def serve_dashboard(name: str, storage: str, port: int) -> int:
    """optuna-dashboard on the sweep's storage, on 127.0.0.1 only (it has no authentication)."""
    sweep = Sweep(name, Path("."), {}, {}, 0, storage=storage)
    if not storage and not sweep.journal.exists():
        raise UserError(f"{sweep.journal}: no study of sweep {name!r} here (make sweep first, or give STORAGE)")
    port = loopback_port(port)
    store = storage_of(sweep)  # a storage that cannot be opened exits 2 here, before an address is printed
    if name not in optuna.study.get_all_study_names(store):
        raise UserError(f"{safe_url(storage) if storage else sweep.journal}: no study named {name!r}")
    print(f"optuna-dashboard for sweep {name!r}: http://127.0.0.1:{port}/ (Ctrl-C to stop)", flush=True)
    optuna_dashboard.run_server(store, host="127.0.0.1", port=port)
    return 0
