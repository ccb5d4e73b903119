"""The one-command chain on a tiny demo: a valid CSV, a second run that does nothing, and resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import TINY
from seedlings.predict.submission import validate_submission

FAST = [*TINY, "precompute_d4=false"]


def submit_cmd(data, run="tiny"):
    return [sys.executable, "-m", "seedlings.cli", "submit", "--data", str(data), "--run", run, "--n-folds", "3", *FAST]


def test_submit_writes_valid_csv_then_skips_everything(demo_master, home):
    env = {**os.environ, "SEEDLINGS_HOME": str(home)}
    first = subprocess.run(submit_cmd(demo_master), env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    csv = home / "submissions" / "tiny.csv"
    assert validate_submission(demo_master, csv) == len(pd.read_csv(demo_master / "sample_submission.csv"))
    prov = json.loads(csv.with_suffix(".json").read_text())
    assert prov["run"] == "tiny" and prov["recipe"]["model"] == "test_efficientnet" and "blend" in prov["members"]
    assert set(prov["seconds"]) == {"folds", "train", "predict", "blend"} and prov["command"]
    assert (home / "runs" / "tiny" / "report" / "report.md").exists()
    assert (home / "runs" / "tiny" / "probs" / "fold2-stage2-cycle1.test.csv").exists()
    evaluated = subprocess.run(
        [*submit_cmd(demo_master)[:3], "evaluate", *submit_cmd(demo_master)[4:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    check_evaluate_numbers(evaluated.stdout, home)
    stamps = {p: p.stat().st_mtime_ns for p in (home / "runs" / "tiny").rglob("*.pt")}
    stamps.update({p: p.stat().st_mtime_ns for p in (home / "runs" / "tiny" / "probs").glob("fold*.csv")})
    assert len(stamps) > 20
    before = csv.read_bytes()
    csv.with_suffix(".json").unlink()  # the second run writes it again
    second = subprocess.run(submit_cmd(demo_master), env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0
    assert second.stdout.count("nothing to do") == 3
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # no model trained or predicted again
    assert csv.read_bytes() == before and csv.with_suffix(".json").exists()


def check_evaluate_numbers(stdout: str, home) -> None:
    """The numbers `evaluate` prints, recomputed here from the saved probabilities with pandas alone."""
    rows = {}
    for line in stdout.splitlines()[1:]:
        what, f1, loss = line.rsplit(maxsplit=2)
        rows[what.strip()] = (float(f1), float(loss))
    (folds_csv,) = (home / "data" / "folds").glob("*-k3-s0.csv")
    label = pd.read_csv(folds_csv).set_index("file").species
    probs = home / "runs" / "tiny" / "probs"

    def scored(df: pd.DataFrame) -> tuple[float, float]:
        p = df.set_index("file")
        truth = label.loc[p.index]
        p_true = [p.at[f, s] for f, s in truth.items()]
        return round(float((p.idxmax(axis=1) == truth).mean()), 4), round(float(-np.log(p_true).mean()), 4)

    assert rows["fold0-stage2-cycle1 (TTA)"] == pytest.approx(
        scored(pd.read_csv(probs / "fold0-stage2-cycle1.oof.csv")), abs=1e-4
    )
    assert rows["fold2-stage2-cycle1 (no TTA)"] == pytest.approx(
        scored(pd.read_csv(probs / "fold2-stage2-cycle1.oof-notta.csv")), abs=1e-4
    )
    members = pd.concat(pd.read_csv(p) for p in sorted(probs.glob("fold*.oof.csv")))  # 3 folds x 2 snapshots
    assert len(members) == 2 * len(label)
    blend = members.groupby("file").mean().reset_index()
    assert rows["all folds x 2 snapshots, equal blend (TTA)"] == pytest.approx(scored(blend), abs=1e-4)


@pytest.mark.slow  # 20 to 40 s on a 2-core CPU: with the slow tests, which CI runs too
def test_killed_submit_resumes(demo_master, home):
    env = {**os.environ, "SEEDLINGS_HOME": str(home)}
    proc = subprocess.Popen(
        submit_cmd(demo_master, "killed"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = home / "runs" / "killed" / "fold1" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # killed mid-way through fold 1
    proc.wait()
    assert ckpt.exists() and not (home / "runs" / "killed" / "fold1" / "done.json").exists()
    again = subprocess.run(submit_cmd(demo_master, "killed"), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "fold0: finished, nothing to do" in again.stdout.replace(str(home / "runs" / "killed") + "/", "")
    assert "resuming at stage" in again.stdout
    assert validate_submission(demo_master, home / "submissions" / "killed.csv") > 0


@pytest.mark.slow
def test_make_demo_from_scratch(tmp_path):
    """`make demo` as the README says, in a copy of the repo (about 5 minutes on 2 cores)."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    dst = tmp_path / "repo"
    shutil.copytree(repo, dst, ignore=shutil.ignore_patterns(".venv", "data", "runs", "submissions", ".git", "kaggle"))
    (dst / ".venv").symlink_to(repo / ".venv")
    (dst / "submissions").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SEEDLINGS_HOME"}
    env["SEEDLINGS_HOME"] = str(dst)
    r = subprocess.run(
        ["make", "-W", ".venv/.installed", "demo"], cwd=dst, env=env, capture_output=True, text=True, timeout=1800
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert validate_submission(dst / "data" / "demo", dst / "submissions" / "demo.csv") > 0


def test_blend_only_trains_no_fold_and_blends_those_done(demo_master, home, capsys):
    """--blend-only (BLEND_ONLY=1, the job after a cluster's fold array): fold 1 untrained is named, not trained, and
    folds 0 and 2 make the submission (the chain used to stop at predicting a fold it had left out)."""
    from conftest import tiny_run
    from seedlings.chain.submit import submit
    from seedlings.train.fit import train_fold

    run = tiny_run(demo_master, "bo", "stages=[{size: 32, freeze: false, lr: 0.003, n_cycles: 1, cycle_len: 1}]")
    for fold in (0, 2):
        train_fold(run, fold)
    out = submit(run, train=False)
    assert validate_submission(demo_master, out) > 0 and not run.is_trained(1)
    assert "fold 1 is not in this blend: not trained" in capsys.readouterr().err
    assert json.loads(out.with_suffix(".json").read_text())["missing_folds"] == [1]


def test_a_second_submit_of_a_run_refuses_naming_the_first(demo_master, home):
    """Two submits of one run at once would each blend only the folds it trained, and the last writer's partial blend
    would become the submission: the second exits 2 at once, naming the holder, and trains nothing."""
    from seedlings.paths import submission_path
    from seedlings.storage import exclusive

    lock = submission_path("tiny").with_name(".tiny.lock")
    with exclusive(lock, "the submission of run 'tiny'"):  # the first submit, still running
        done = subprocess.run(submit_cmd(demo_master), capture_output=True, text=True, timeout=300,
                              env={**os.environ, "SEEDLINGS_HOME": str(home)})  # fmt: skip
    assert done.returncode == 2
    assert f"the submission of run 'tiny' is in use by host {os.uname().nodename} process {os.getpid()}" in done.stderr
    assert not (home / "runs" / "tiny" / "fold0").exists() and not submission_path("tiny").exists()
