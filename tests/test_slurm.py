"""The Slurm templates through a real one-node cluster (conftest.slurm_cluster: munge, slurmctld, slurmd of
the test's own): a fold array then the blend after it."""

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import DEFAULTS, TINY
from seedlings.recipe.load import load_recipe
from seedlings.recipe.schema import recipe_dict

REPO = Path(__file__).resolve().parents[1]
STAGES = "stages=[{size: 32, freeze: false, lr: 0.003, n_cycles: 1, cycle_len: 2, cycle_mult: 1}]"


def wait_for_queue(env: dict, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
            return
        time.sleep(1)
    raise AssertionError("the jobs never ended")


@pytest.mark.slow  # a minute: three fold tasks and the blend, each a make and a Python start
def test_a_fold_array_trains_each_fold_and_the_blend_after_it_names_a_failed_one(slurm_cluster, demo, home, tmp_path):
    """scripts/slurm/submit-folds.sh with every setting in the environment: task k trains fold k; fold 1 is made to
    fail (a checkpoint that is not one); the blend, started after every task whatever its exit (afterany; afterok
    used to drop the submission with one failed fold), trains none, blends folds 0 and 2 and names fold 1."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(recipe_dict(load_recipe(DEFAULTS, [*TINY, STAGES]))))
    broken = home / "runs" / "sl" / "fold1" / "checkpoint.pt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**slurm_cluster, "SEEDLINGS_HOME": str(home), "DATA": str(demo), "CONFIG": str(config), "RUN": "sl",
           "N_FOLDS": "3", "FOLD_GRES": "", "SUBMIT_GRES": "", "FOLD_CPUS": "1", "SUBMIT_CPUS": "1",
           "FOLD_TIME": "10:00", "SUBMIT_TIME": "10:00", "SLURM_LOGS": str(logs)}  # fmt: skip
    started = subprocess.run(["scripts/slurm/submit-folds.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert started.returncode == 0, started.stderr
    wait_for_queue(env)
    runs = home / "runs" / "sl"
    assert (runs / "fold0" / "done.json").is_file() and (runs / "fold2" / "done.json").is_file()
    assert not (runs / "fold1" / "done.json").exists()
    fold1 = next(logs.glob("slurm-seedlings-fold-*_1.out")).read_text()
    assert "checkpoint.pt" in fold1
    blend = next(logs.glob("slurm-seedlings-blend-*.out")).read_text()
    assert "fold 1 is not in this blend" in blend, blend[-3000:]
    assert (home / "submissions" / "sl.csv").is_file(), blend[-3000:]


@pytest.mark.slow  # about a minute and a half: two worker tasks, one cancelled mid-trial
def test_a_sweep_worker_array_ends_the_study_exactly_when_a_task_is_cancelled(slurm_cluster, postgres, data, home,
                                                                              tmp_path):  # fmt: skip
    """scripts/slurm/sweep-workers.sbatch: two tasks join the study `make sweep-study` made (settings from the
    environment, the password never on a command line), one is cancelled with scancel mid-trial, the other retries
    that trial from its checkpoint once its heartbeat's grace is over, and the study ends with exactly TRIALS."""
    import optuna

    from seedlings.lab.sweep.worker import slots_taken

    config = tmp_path / "tiny.yaml"
    stages = "stages=[{size: 32, freeze: false, lr: 0.003, n_cycles: 1, cycle_len: 40, cycle_mult: 1}]"
    config.write_text(yaml.safe_dump(recipe_dict(load_recipe(DEFAULTS, [*TINY, stages]))))
    space = tmp_path / "space.yaml"
    space.write_text("drop_rate: [0.1, 0.3]\n")
    env = {**slurm_cluster, "SEEDLINGS_HOME": str(home), "DATA": str(data), "CONFIG": str(config), "SPACE": str(space),
           "SWEEP": "s", "TRIALS": "3", "N_FOLDS": "3", "PRUNER": "none", "STORAGE": postgres, "HEARTBEAT": "1",
           "GRACE": "5", "MAKEFLAGS": ""}  # fmt: skip
    made = subprocess.run(["make", "-s", "-o", ".venv/.installed", "sweep-study"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr
    array = subprocess.run(["sbatch", "--parsable", "--array=1-2", "--cpus-per-task=1", f"--output={tmp_path}/w-%a.out",
                            "scripts/slurm/sweep-workers.sbatch"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert array.returncode == 0, array.stderr
    job = array.stdout.strip()
    metrics = home / "runs" / "s" / "trial-0000" / "fold0" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        time.sleep(0.2)
    task = next(k for k in (1, 2) if "[trial 0]" in (tmp_path / f"w-{k}.out").read_text())
    subprocess.run(["scancel", f"{job}_{task}"], env=env, check=True, timeout=30)
    wait_for_queue(env)
    trials = optuna.load_study(study_name="s", storage=postgres).get_trials()
    assert slots_taken(trials) == 3 and sum(t.state.name == "COMPLETE" for t in trials) == 3
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.state.name == "COMPLETE" and retry.params == trials[0].params
    other = (tmp_path / f"w-{3 - task}.out").read_text()
    assert "resuming at stage 0" in other, other[-3000:]  # from the cancelled task's last checkpoint
