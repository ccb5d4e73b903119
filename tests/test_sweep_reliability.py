"""The sweep's hard cases: Ctrl-C under `make sweep`, a damaged or lost journal, a space none of whose combinations is
a recipe, an error every trial would meet, the database server gone mid-trial. Each ends as one line (exit 2, 130
for an interrupt) and leaves the study resumable, never replaced."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from conftest import DEFAULTS, TINY
from seedlings.cli import main
from seedlings.lab.sweep.study import recorded_settings
from seedlings.lab.sweep.worker import slots_taken
from seedlings.recipe.load import load_recipe
from seedlings.recipe.schema import recipe_dict
from test_sweep import STAGES, finished_trials, journal, space_file, sweep_cmd, worker

REPO = Path(__file__).resolve().parents[1]


def wait_for_epochs(metrics: Path, rows: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(pd.read_csv(metrics)) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"{metrics}: {rows} rows never came (exit {proc.poll()})")


def group_gone(pgid: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow  # 37 s: make test stays within its 10 minutes
def test_ctrl_c_stops_make_sweep_and_the_rerun_resumes_the_trial(data, home, tmp_path):
    """SIGINT to make's process group, as a terminal sends it: make and its workers are gone within 10 s (workers
    started with & in make's shell used to ignore it and train on), the interrupted trial is queued again, and the
    rerun resumes it from its checkpoint and ends with exactly TRIALS counted."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(recipe_dict(load_recipe(DEFAULTS, [*TINY, STAGES % 5]))))
    space = space_file(tmp_path, "drop_rate: [0.2, 0.3]\n")
    cmd = ["make", "-s", "-W", ".venv/.installed", "sweep", f"DATA={data}", f"CONFIG={config}", f"SPACE={space}",
           "TRIALS=1", "SWEEP=s", "N_FOLDS=3", "PRUNER=none", "GRADE=0"]  # fmt: skip
    env = {**os.environ, "SEEDLINGS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    make = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for_epochs(home / "runs" / "s" / "trial-0000" / "fold0" / "metrics.csv", 3, make)
    os.killpg(make.pid, signal.SIGINT)
    out = make.communicate(timeout=60)[0]
    assert group_gone(make.pid, 10), "a worker outlived Ctrl-C"
    assert make.returncode != 0
    assert "trial 0: interrupted; queued again" in out and "Traceback" not in out and "failed with" not in out, out
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming at stage 1" in rerun.stdout
    trials = finished_trials(journal(home))
    assert slots_taken(trials) == 1 and [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params


# ---------------------------------------------------------------------------------------------- a damaged journal
@pytest.fixture
def study(data, tmp_path, home):
    """A study made by `sweep --create-only`: its journal holds the study and its settings."""
    args = sweep_cmd(data, space_file(tmp_path), 2)
    assert main([*args, "--create-only"]) == 0
    return args, home / "runs" / "s" / "study.journal"


def test_a_journal_cut_mid_line_is_repaired_not_appended_to(study, capsys):
    args, path = study
    whole = path.read_bytes()
    os.truncate(path, len(whole) - 25)
    capsys.readouterr()
    assert main([*args, "--create-only"]) == 0
    assert "cut mid-write" in capsys.readouterr().err
    cut = whole[:-25]
    kept = cut[: cut.rindex(b"\n") + 1]  # the records before the cut one
    now = path.read_bytes()  # those, then what the second command appended (Optuna's load_if_exists writes too)
    assert now.startswith(kept) and all(json.loads(line)["op_code"] >= 0 for line in now.splitlines())
    assert path.with_name("study.journal.damaged").read_bytes() == cut
    storage = journal(path.parents[2])
    assert recorded_settings(storage, optuna.load_study(study_name="s", storage=storage))["space"]


@pytest.mark.parametrize("damage", ["line", "binary"])
@pytest.mark.parametrize("command", ["sweep", "sweep-report", "dashboard"])
def test_a_damaged_journal_is_refused_naming_the_line(study, capsys, damage, command):
    args, path = study
    lines = path.read_bytes().splitlines(keepends=True)
    if damage == "line":
        path.write_bytes(b"".join([lines[0], b"not json\n", *lines[1:]]))
    else:
        path.write_bytes(b"".join(lines) + b"\x00\xff\x10binary")
    before = path.read_bytes()
    capsys.readouterr()
    argv = args if command == "sweep" else [command, "--sweep", "s"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    line = 2 if damage == "line" else len(lines) + 1
    assert f"study.journal: line {line} is not an Optuna journal record" in err and len(err.splitlines()) == 1
    assert path.read_bytes() == before


@pytest.mark.parametrize("loss", ["emptied", "deleted"])
def test_a_lost_journal_beside_trial_folders_is_refused(study, capsys, loss):
    """A new study would start over in the old trials' folders, each trial meeting a run it did not train."""
    args, path = study
    (path.parent / "trial-0000").mkdir()
    path.write_bytes(b"") if loss == "emptied" else path.unlink()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "study.journal: " + ("empty" if loss == "emptied" else "missing") in err and "1 trial folder" in err
    assert len(err.splitlines()) == 1
    assert path.read_bytes() == b"" if loss == "emptied" else not path.exists()


# ------------------------------------------------------------------------------ errors that are not the trial's
def test_a_space_with_no_valid_combination_is_refused_before_any_study(data, tmp_path, home, capsys):
    """warmup 2.0 is valid with the base's cycle_len 3 and each cycle_len with the base's warmup 0, but every pair of
    the two fails: the sweep used to run TRIALS failed trials, each with a traceback, and exit 0."""
    space = space_file(tmp_path, "stages.1.warmup: [2.0]\nstages.1.cycle_len: [1, 2]\n")
    assert main(sweep_cmd(data, space, 3)) == 2
    err = capsys.readouterr().err.strip()
    assert "no combination of its values makes a valid recipe" in err and "warmup" in err
    assert len(err.splitlines()) == 1 and not (home / "runs" / "s").exists()


@pytest.mark.slow  # 20 to 40 s on a 2-core CPU: with the slow tests, which CI runs too
def test_an_error_every_trial_would_meet_stops_the_worker_and_keeps_the_trial(data, tmp_path, home):
    """Trial 1's folder holds a config that is not a run's: open_run refuses it, as it would every later trial. The
    worker stops with exit 2 and one line naming the file; trial 1 is queued again, and once the folder is fixed the
    rerun trains it and the study ends with exactly TRIALS counted."""
    args = sweep_cmd(data, space_file(tmp_path, "drop_rate: [0.2, 0.3]\n"), 2, "--pruner", "none", "--no-grade")
    assert main([*args, "--create-only"]) == 0
    folder = home / "runs" / "s" / "trial-0001"
    folder.mkdir()
    (folder / "config.yaml").write_text("- not a run config\n")
    first = worker(args, home, tmp_path)
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 2, out[-3000:]
    assert "trial-0001/config.yaml: not a run config" in out and "Traceback" not in out and "failed with" not in out
    assert any(re.match(r"\[trial 0\] fold \d+/\d+ epoch 1/", line) for line in out.splitlines())  # said by trial
    trials = finished_trials(journal(home))
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
    (folder / "config.yaml").unlink()
    again = worker(args, home, tmp_path)
    assert again.wait(timeout=600) == 0, again.stdout.read()[-3000:]
    trials = finished_trials(journal(home))
    assert slots_taken(trials) == 2 and [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params


@pytest.mark.slow  # 20 to 40 s on a 2-core CPU: with the slow tests, which CI runs too
def test_the_database_gone_mid_trial_ends_the_worker_in_one_line(data, tmp_path, home, postgres_server):
    """The PostgreSQL server stopped as by a crash while a trial trains: the worker used to exit 1 with 301 lines and
    7 tracebacks. Now one line naming the server (exit 2); once it is back, the next worker resumes the trial."""
    space = space_file(tmp_path, "drop_rate: [0.2]\n")
    extra = ["--storage", postgres_server.url, "--heartbeat", "1", "--grace", "3", "--pruner", "none", "--no-grade"]
    args = sweep_cmd(data, space, 1, *extra, epochs=4)
    first = worker(args, home, tmp_path)
    wait_for_epochs(home / "runs" / "s" / "trial-0000" / "fold0" / "metrics.csv", 3, first)
    postgres_server.stop()
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 2
    errors = [line for line in out.splitlines() if not line.startswith(("[trial 0] ", "/"))]  # the trial's own lines
    assert "Traceback" not in out and len(errors) == 1, out[-3000:]
    assert errors[0].startswith("error: STORAGE: lost the study's database at postgresql://postgres@/optuna")
    postgres_server.start()
    again = worker(args, home, tmp_path)  # at once: it finds the trial's heartbeat silent and waits out the grace
    rest = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "resuming at stage 1" in rest, rest[-3000:]
    trials = finished_trials(postgres_server.url)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and trials[1].system_attrs["failed_trial"] == 0


def test_a_heartbeat_that_loses_the_database_stops_the_trial_at_its_next_epoch():
    """Optuna's heartbeat thread used to die with a traceback and leave the trial training without a heartbeat (so
    another worker could retry it at the same time): now it raises a flag that the next epoch stops on."""
    import threading

    from optuna.exceptions import StorageInternalError

    from seedlings.lab.sweep import worker as w

    def args(error):
        return threading.ExceptHookArgs((type(error), error, None, threading.current_thread()))

    seen = []
    default, threading.__excepthook__ = threading.__excepthook__, seen.append
    try:
        w.heartbeat_hook(args(StorageInternalError("commit failed")))
        assert w.HEARTBEAT_LOST.is_set() and not seen
        w.HEARTBEAT_LOST.clear()
        w.heartbeat_hook(args(ValueError("a bug")))  # anything else: the thread's traceback as before
        assert not w.HEARTBEAT_LOST.is_set() and len(seen) == 1
    finally:
        threading.__excepthook__ = default
        w.HEARTBEAT_LOST.clear()


def test_a_storage_url_of_another_kind_is_refused_leaving_nothing(data, tmp_path, home, capsys):
    """It used to leave runs/<sweep>/.sweep.lock behind."""
    assert main(sweep_cmd(data, space_file(tmp_path), 2, "--storage", "redis://user:secret@host/0")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --storage: expected postgresql://") and "secret" not in err
    assert not (home / "runs" / "s").exists()


def test_a_report_of_no_trials_draws_no_plot_and_warns_nothing(study, home):
    """It used to write three empty plots and pass on Optuna's and matplotlib's warnings."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["sweep-report", "--sweep", "s"]) == 0
    assert not [str(w.message) for w in seen]
    folder = home / "runs" / "s"
    assert "plots: not drawn (0 trial(s) with a score)" in (folder / "report.md").read_text()
    assert not list(folder.glob("*.png"))


def test_a_sweep_name_outside_runs_names_its_own_flag(data, tmp_path, capsys):
    """It used to say `--run: ...`, a flag the sweep has not."""
    assert main(sweep_cmd(data, space_file(tmp_path), 2, "--sweep", "../x")) == 2
    assert capsys.readouterr().err.strip() == "error: --sweep: '../x' is not a usable folder name under runs/"


def test_trials_other_than_the_studys_are_refused_unless_added(study, capsys):
    """TRIALS=3 on a 2-trial study used to run a third trial silently; ADD_TRIALS=1 (--add-trials) raises it."""
    args, path = study
    capsys.readouterr()
    assert main([*args, "--trials", "3", "--create-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --trials: study 's' holds 2 trials, given 3; give TRIALS=2, or ADD_TRIALS=1 to raise it to 3"
    assert main([*args, "--trials", "1", "--add-trials", "--create-only"]) == 2
    assert main([*args, "--trials", "3", "--add-trials", "--create-only"]) == 0
    assert optuna.load_study(study_name="s", storage=journal(path.parents[2])).user_attrs["trials"] == 3
    assert main([*args, "--trials", "3", "--create-only"]) == 0


@pytest.mark.slow  # 25 s: a sweep, then a chain of three folds through make
def test_best_yaml_states_the_command_that_gives_its_trials_score(data, tmp_path, home):
    """best.yaml's command trains the best trial's recipe as the trial was trained (its data, split and CPU
    thread count, which a CPU's results depend on) into a run of its own, and its fold 0 scores what the trial did,
    to the last digit. It used to say `make submit CONFIG=...` alone: other threads, another score, runs/best."""
    import shlex

    from test_sweep import run_workers

    run_workers(1, sweep_cmd(data, space_file(tmp_path, "drop_rate: [0.2]\n"), 1, "--pruner", "none"), home,
                [tmp_path])  # fmt: skip
    best = home / "runs" / "s" / "best.yaml"
    command = best.read_text().splitlines()[1].removeprefix("# ")
    assert command.startswith("SEEDLINGS_THREADS=") and command.endswith("RUN=s-best"), command
    words = shlex.split(command)
    env = {**os.environ, "SEEDLINGS_HOME": str(home), words[0].split("=")[0]: words[0].split("=")[1]}
    done = subprocess.run([*words[1:3], "-s", "-W", ".venv/.installed", *words[3:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    trial = finished_trials(journal(home))[0]
    again = json.loads((home / "runs" / "s-best" / "fold0" / "done.json").read_text())["val_f1"]
    assert round(again, 4) == trial.value  # the study stores a score to 4 digits


def test_the_study_names_its_metric_for_the_dashboard(study):
    """The dashboard's axis names the metric (it read "Objective 0")."""
    args, path = study
    loaded = optuna.load_study(study_name="s", storage=journal(path.parents[2]))
    assert loaded.metric_names == ["val micro-F1"]


def test_the_dashboard_shows_the_studys_settings_as_a_note_with_round_numbers(study):
    """optuna-dashboard showed the settings as one JSON attribute, cut; the study's note says them in words instead,
    ranges rounded as the report rounds them, and the attribute table holds short values only."""
    import optuna_dashboard

    args, path = study
    loaded = optuna.load_study(study_name="s", storage=journal(path.parents[2]))
    assert "settings" not in loaded.user_attrs and all(len(str(v)) < 200 for v in loaded.user_attrs.values())
    note = optuna_dashboard.get_note(loaded)
    assert "| `stages.1.lr` | 1.00e-04 to 0.03 (log) |" in note and "| `drop_rate` | `0.1`, `0.3` |" in note
    assert "3 folds of fold seed" in note and "2 trials" in note and "`model=test_efficientnet`" in note
